"""Shared fixtures: model checkpoints come from flexeval's cache (converted or generated once).
Plain helpers are in `tests/helpers.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexeval import Engine
from flexeval.models import registry, tiny
from tests.helpers import TINY, flexeval

NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped, saying why, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-policy sweep of the tiny model over 8 PIQA questions, run once as a user runs it:
    its directory (tests/test_app.py reads its tables, tests/test_report.py rebuilds them)."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = flexeval(cwd, "-m", *TINY, "policy=all-resident,cpu-offload,disk-offload")
    assert result.returncode == 0, result.stderr[-3000:]
    (directory,) = (cwd / "outputs").glob("*/*-sweep")
    return directory
