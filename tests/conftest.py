"""Shared fixtures: model checkpoints come from flexeval's cache (converted or generated once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexeval import Engine
from flexeval.models import registry, tiny

TINY_MODELS = tuple(tiny.CONFIGS)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return registry.resolve(registry.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path) -> Engine:
    return Engine.load(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir: Path):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A private copy-able tiny Llama checkpoint, for tests that damage it."""
    directory = tmp_path / "tiny-llama"
    tiny.write_tiny("tiny-llama", directory)
    return directory
