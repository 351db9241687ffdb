"""GPTQ: fitted codes on min-max grids, fitted while the engine loads, cached on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexeval import Engine, Policy
from flexeval.errors import FlexevalError
from flexeval.lm import FlexGenLM
from flexeval.quantization import gptq as gptq_module
from flexeval.quantization.calibration import Calibration
from flexeval.quantization.compression import dequantize, quantize, quantized_nbytes
from flexeval.quantization.config import CompressionConfig
from flexeval.quantization.gptq import gptq

GPTQ = CompressionConfig(4, 64, 1, "gptq")
MINMAX = CompressionConfig(4, 64, 1)
TEXT = "The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill. " * 3


def inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few dominant channels, as a transformer's are."""
    mixing = torch.randn(width, width, generator=torch.Generator().manual_seed(0)) / width**0.5
    channels = torch.ones(width)
    channels[:: width // 8] = 8.0
    return (torch.randn(n, width, generator=torch.Generator().manual_seed(seed + 1)) @ mixing) * channels


@pytest.mark.parametrize("group_dim", [0, 1])
def test_gptq_errs_less_than_min_max_on_the_outputs_it_was_fitted_to(group_dim: int) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=g)
    x = inputs(2048, 256)
    config = CompressionConfig(4, 64, group_dim)
    q_fit = gptq(w, (x.T @ x).double(), CompressionConfig(4, 64, group_dim, "gptq"))
    q_near = quantize(w, config)
    fresh = inputs(2048, 256, seed=2)  # fitted on x, measured on other inputs from the same distribution

    def error(q) -> float:
        return float((fresh @ (dequantize(q) - w).T).square().mean())

    assert error(q_fit) < 0.7 * error(q_near)
    # same grids (as stored) and every code on them: only the rounding differs
    assert torch.equal(q_fit.scale, quantize(w, CompressionConfig(4, 64, group_dim, "gptq")).scale)


def test_a_fitted_matrix_takes_4_5_bits_a_weight_in_every_dtype() -> None:
    w = torch.randn(128, 256)
    for dtype in (torch.float32, torch.bfloat16):
        q = gptq(w.to(dtype), torch.eye(256, dtype=torch.float64), GPTQ)
        assert q.scale.dtype == torch.float16 and q.minimum.dtype.itemsize == 2
        assert q.nbytes == quantized_nbytes(tuple(w.shape), dtype, GPTQ) == 128 * 256 * 4.5 / 8
        assert dequantize(q).dtype == dtype


def test_inputs_that_were_always_zero_cost_nothing() -> None:
    x = inputs(512, 128)
    x[:, 5] = 0
    w = torch.randn(16, 128)
    q = gptq(w, (x.T @ x).double(), GPTQ)
    assert torch.isfinite(dequantize(q)).all()


def calibration(tmp_path: Path, lines: int = 40, **fields) -> Calibration:
    path = tmp_path / "calibration.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i}. {TEXT}"}) + "\n" for i in range(lines)))
    return Calibration(str(path), "text", **({"sequences": 4, "length": 32} | fields))


def test_a_fitted_model_is_closer_to_the_original_than_min_max(tmp_path: Path) -> None:
    reference = Engine.load("tiny-llama")
    text = reference.tokenizer("A lazy dog sleeps by the window; the quick fox watches the cat.").input_ids
    original = reference.logprobs([text])[0]
    calib = calibration(tmp_path, sequences=16)

    def distance(config: CompressionConfig) -> float:
        policy = Policy(compress_weight=True, comp_weight_config=config)
        engine = Engine.load("tiny-llama", policy=policy, calibration=calib, cache_dir=tmp_path / "cache")
        return float((engine.logprobs([text])[0] - original).abs().mean())

    assert distance(GPTQ) < distance(MINMAX)


def test_fitted_weights_are_cached_and_read_back_unchanged(tmp_path: Path, monkeypatch) -> None:
    policy = Policy(compress_weight=True, comp_weight_config=GPTQ, w_gpu_percent=0, w_cpu_percent=50)
    load = dict(policy=policy, calibration=calibration(tmp_path), offload_dir=tmp_path)
    first = Engine.load("tiny-llama-gqa", cache_dir=tmp_path / "cache", **load).logprobs([[5, 6, 7, 8, 9]])
    (saved,) = (tmp_path / "cache" / "gptq").glob("*.safetensors")

    def refit(*args, **kwargs):
        raise AssertionError("fitted again")

    monkeypatch.setattr(gptq_module.Fitter, "__init__", refit)
    again = Engine.load("tiny-llama-gqa", cache_dir=tmp_path / "cache", **load).logprobs([[5, 6, 7, 8, 9]])
    assert torch.equal(first[0], again[0])
    assert list((tmp_path / "cache" / "gptq").iterdir()) == [saved]  # no scratch files left behind
    with pytest.raises(AssertionError, match="fitted again"):  # other calibration text: another fit
        other = load | {"calibration": calibration(tmp_path, 41)}
        Engine.load("tiny-llama-gqa", cache_dir=tmp_path / "cache", **other)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama-gqa"])
def test_every_family_fits_every_matrix_it_multiplies_by(name: str, tmp_path: Path, monkeypatch) -> None:
    fitted: list[str] = []
    fit = gptq_module.gptq
    monkeypatch.setattr(gptq_module, "gptq", lambda w, h, c: fitted.append(tuple(w.shape)) or fit(w, h, c))
    policy = Policy(compress_weight=True, comp_weight_config=GPTQ)
    engine = Engine.load(name, policy=policy, calibration=calibration(tmp_path), cache_dir=tmp_path / "cache")
    matrices = [
        p.shape
        for layer in engine.model.layers
        if layer.kind in ("attention", "mlp")
        for p in layer.params.values()
        if len(p.shape) == 2
    ]
    assert len(matrices) >= 4 * engine.model.num_blocks
    assert sorted(fitted) == sorted(matrices)  # the embeddings' tables are looked up, not multiplied: min-max


def test_calibration_problems_are_reported_before_weights_load(tmp_path: Path) -> None:
    policy = Policy(compress_weight=True, comp_weight_config=GPTQ)
    with pytest.raises(FlexevalError, match="does not exist"):
        Engine.load("tiny-llama", policy=policy, calibration=Calibration(str(tmp_path / "missing.jsonl")))
    with pytest.raises(FlexevalError, match="no field 'document'"):
        Engine.load("tiny-llama", policy=policy, calibration=Calibration(calibration(tmp_path).path))
    with pytest.raises(FlexevalError, match="fewer than 400 x 32"):
        Engine.load("tiny-llama", policy=policy, calibration=calibration(tmp_path, lines=2, sequences=400))
    with pytest.raises(FlexevalError, match="sequences must be a positive integer"):
        Calibration(sequences=0)


def test_the_kv_cache_cannot_take_a_gptq_fit() -> None:
    with pytest.raises(FlexevalError, match="comp_cache_config.fit cannot be gptq"):
        Policy(compress_cache=True, comp_cache_config=CompressionConfig(4, 64, -1, "gptq"))


def test_the_backend_takes_a_calibration_and_a_gptq_preset(tmp_path: Path) -> None:
    calib = calibration(tmp_path)
    spec = f"{calib.path}:text:4:32"
    assert Calibration.parse(spec) == calib
    lm = FlexGenLM(pretrained="tiny-llama", compression="4bit-weights-gptq", calibration=spec)
    assert lm.policy.comp_weight_config == GPTQ
    for bad in (f"{calib.path}:text:four", f"{calib.path}:text:4:32:9"):
        with pytest.raises(FlexevalError, match="calibration takes path"):
            Calibration.parse(bad)
