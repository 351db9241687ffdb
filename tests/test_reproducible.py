"""Results free of batch shape on any CPU: the row-count probe and the padding it decides.

A BLAS that rounds a product of few rows differently (MKL on AMD EPYC: 1-3 rows) is simulated
here on every machine by wrapping `F.linear` so that products of fewer than `THRESHOLD` rows
move by one unit in their last place; the engine must still give every sequence the same bits
under every batch shape, and must not once the padding is switched off.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexeval import Engine, Policy, reproducible
from flexeval.engine import engine as engine_module
from flexeval.reproducible import MOST_PADDED_ROWS, probe_gemm_rows, safe_gemm_rows
from tests.helpers import DISK, sequences

CPU = torch.device("cpu")
THRESHOLD = 6  # above what any machine's own BLAS needs so far (AMD: 4, Intel: 1)
SHAPES = [(64, 64), (64, 258), (128, 64)]


def rounding_below(rows: int, real: Callable = F.linear) -> Callable:
    """F.linear, except that a product of fewer than `rows` rows is off in its last bit."""

    def linear(x, weight, bias=None):
        out = real(x, weight, bias)
        if x.numel() // x.shape[-1] < rows:
            out = torch.nextafter(out, torch.full_like(out, math.inf))
        return out

    return linear


def rounding_by_count(real: Callable = F.linear) -> Callable:
    """F.linear whose every row depends on how many rows came with it: no padding helps."""

    def linear(x, weight, bias=None):
        out = real(x, weight, bias)
        return out + (x.numel() // x.shape[-1]) * torch.finfo(out.dtype).eps * out.abs()

    return linear


def test_the_probe_finds_the_rows_a_row_dependent_blas_needs(monkeypatch) -> None:
    machine = probe_gemm_rows(SHAPES, torch.float32, CPU)
    assert machine is not None and machine < THRESHOLD
    monkeypatch.setattr(F, "linear", rounding_below(THRESHOLD))
    assert probe_gemm_rows(SHAPES, torch.float32, CPU) == THRESHOLD
    monkeypatch.setattr(F, "linear", rounding_below(MOST_PADDED_ROWS + 1))
    assert probe_gemm_rows(SHAPES, torch.float32, CPU) is None


def test_when_no_padding_helps_loading_warns_once_and_pads_nothing(monkeypatch, tmp_path: Path, caplog) -> None:
    reproducible._warn_once.cache_clear()  # once a process: this test's process may have warned before
    monkeypatch.setattr(F, "linear", rounding_by_count())
    with caplog.at_level(logging.WARNING, logger="flexeval.reproducible"):
        assert safe_gemm_rows(SHAPES, torch.float32, CPU, tmp_path) == 1
        assert safe_gemm_rows(SHAPES, torch.float32, CPU, tmp_path) == 1  # from the cache, still known
    (warning,) = caplog.messages
    assert "depend on how many rows" in warning and f"MKL_CBWR={os.environ['MKL_CBWR']}" in warning


def test_the_probe_runs_once_per_machine_and_shapes(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(F, "linear", rounding_below(THRESHOLD))
    assert safe_gemm_rows(SHAPES, torch.float32, CPU, tmp_path) == THRESHOLD
    (cached,) = (tmp_path / "reproducible").iterdir()

    def no_probe(*args):
        raise AssertionError("probed again")

    monkeypatch.setattr(reproducible, "probe_gemm_rows", no_probe)
    assert safe_gemm_rows(reversed(SHAPES), torch.float32, CPU, tmp_path) == THRESHOLD
    with pytest.raises(AssertionError, match="probed again"):
        safe_gemm_rows(SHAPES[:1], torch.float32, CPU, tmp_path)
    cached.write_text("{")  # damaged: probed anew, not trusted
    monkeypatch.undo()
    monkeypatch.setattr(F, "linear", rounding_below(THRESHOLD))
    assert safe_gemm_rows(SHAPES, torch.float32, CPU, tmp_path) == THRESHOLD


def run(policy: Policy, offload: Path) -> tuple[list[torch.Tensor], list]:
    """Log-probabilities of whole sequences and of continuations read through decoding steps (a
    row per sequence and step), and greedy generations."""
    seqs = sequences(24)
    engine = Engine.load("tiny-llama-gqa", policy=policy, offload_dir=offload, device="cpu")
    try:
        generated = engine.generate(seqs[:10], max_new_tokens=6, stop_token_ids=[])
        decoded = engine.decode_logprobs(seqs[:10], [s[:4] for s in seqs[10:20]])
        return engine.logprobs(seqs) + decoded, generated
    finally:
        engine.close()


def test_padding_keeps_results_free_of_batch_shape_under_a_row_dependent_blas(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(F, "linear", rounding_below(THRESHOLD))
    probe_now = lambda shapes, dtype, device, cache: probe_gemm_rows(shapes, dtype, device)  # noqa: E731 - uncached
    monkeypatch.setattr(engine_module, "safe_gemm_rows", probe_now)
    assert Engine.load("tiny-llama-gqa", device="cpu").gemm_rows == THRESHOLD
    reference_lp, reference_gen = run(Policy(gpu_batch_size=1), tmp_path)
    cache_in_ram = dict(cache_gpu_percent=0, cache_cpu_percent=100, sep_layer=False)
    for shape, fields in [((4, 1), {}), ((16, 2), DISK), ((3, 4), cache_in_ram)]:
        lp, gen = run(Policy(*shape, **fields), tmp_path)
        assert gen == reference_gen, shape
        assert all(torch.equal(a, b) for a, b in zip(lp, reference_lp)), shape

    monkeypatch.setattr(engine_module, "safe_gemm_rows", lambda *args: 1)  # the padding switched off
    alone_lp, _ = run(Policy(gpu_batch_size=1), tmp_path)
    together_lp, _ = run(Policy(16, 2), tmp_path)
    assert not all(torch.equal(a, b) for a, b in zip(alone_lp, together_lp))


def test_this_machine_needs_no_warning(caplog) -> None:
    """What the README promises on the CPU holds here: some padding makes products row-invariant."""
    with caplog.at_level(logging.WARNING, logger="flexeval.reproducible"):
        Engine.load("tiny-llama-gqa", device="cpu")
    assert caplog.messages == []


def test_a_users_own_mkl_mode_is_kept() -> None:
    code = "import os, flexeval.reproducible; print(os.environ['MKL_CBWR'])"
    env = {**os.environ, "MKL_CBWR": "AUTO"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "AUTO"


def test_the_cpu_is_told_apart_by_family_and_model_where_its_name_is_only_the_vendors_line():
    """Zen 4 and Zen 5 virtual machines both call themselves "AMD EPYC"; cached probes and
    profiles must not pass from one to the other."""
    zen = (
        "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\n"
        "model\t\t: {model}\nmodel name\t: AMD EPYC\nstepping\t: 1\n"
    )
    zen4, zen5 = zen.format(n=0, family=25, model=17), zen.format(n=0, family=26, model=2)
    assert reproducible.describe_cpu(zen4 + "\n" + zen.format(n=1, family=25, model=17)) == (
        "AMD EPYC (cpu family 25, model 17, stepping 1)"
    )
    assert reproducible.describe_cpu(zen4) != reproducible.describe_cpu(zen5)
    assert reproducible.describe_cpu("model name\t: Some CPU\n") == "Some CPU"
