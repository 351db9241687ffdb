"""Shared fixtures: model checkpoints come from flexeval's cache (converted or generated once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexeval import Engine
from flexeval.models import registry, tiny

TINY_MODELS = tuple(tiny.CONFIGS)


def same_results(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether two runs' log-probabilities agree as far as the compute device promises.

    Engines compute on CUDA when it exists. On the CPU a sequence's results are bitwise free of
    batch shape and placement (MKL's strict mode, attention over real columns); cuBLAS picks its
    kernels by shape, so on CUDA they agree to float32 rounding only (README, Engine).
    """
    if len(a) != len(b):
        return False
    if not torch.cuda.is_available():
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-5) for x, y in zip(a, b))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return registry.resolve(registry.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path) -> Engine:
    return Engine.load(smollm2_dir, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir: Path):
    return registry.hf_model(smollm2_dir)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A private copy-able tiny Llama checkpoint, for tests that damage it."""
    directory = tmp_path / "tiny-llama"
    tiny.write_tiny("tiny-llama", directory)
    return directory
