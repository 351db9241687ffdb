"""Accuracy regression tests of compression: SmolLM2-135M on fixed subsets of the shared data,
compressed against uncompressed through the same engine (`make test-accuracy`).

The pinned values were measured with these very functions (2026-11-26, on the 2-core CPU of
this project's machines; `python -m tests.test_accuracy` prints them anew). The engine's fp32
results do not depend on batch shape or placement, so on one machine they repeat exactly; the
tolerances leave room for another CPU's rounding and nothing more (a GPTQ fit is itself rounded
differently by another CPU: see FITTED_PERPLEXITY_SHARE). They are tight enough that a
quantizer defect moves the metrics out of them: the last test plants three and checks that.

What compression costs against uncompressed is measured on the issue's 1,000 documents by
`benchmarks/compression_accuracy.py`, not asserted here: 300 LAMBADA documents cannot resolve
8 bits' 1 % of perplexity (8-bit weights grouped along the output dimension: -0.5 % here,
-1.3 % on 1,000; along the input dimension: +1.2 % here, +0.6 % on 1,000).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

import lm_eval
import pytest
import torch

import flexeval.lm  # noqa: F401 - registers the backend `flexgen`
from flexeval import Policy
from flexeval.data import local_tasks
from flexeval.engine import placement
from flexeval.engine.placement import compression
from flexeval.models.common import Param
from flexeval.quantization.compression import Quantized, dequantize
from flexeval.quantization.config import CompressionConfig

pytestmark = pytest.mark.accuracy

SUBSETS = {"lambada_openai": 300, "hellaswag": 200}  # the first documents of each task
Metrics = dict[str, float]  # "task/metric" -> accuracy in points, or perplexity
PINNED: dict[str, Metrics] = {
    "none": {
        "lambada_openai/acc": 32.667,
        "lambada_openai/perplexity": 43.712,
        "hellaswag/acc": 40.5,
        "hellaswag/acc_norm": 47.0,
    },
    "4bit-weights": {
        "lambada_openai/acc": 19.0,
        "lambada_openai/perplexity": 112.303,
        "hellaswag/acc": 39.0,
        "hellaswag/acc_norm": 43.5,
    },
    "4bit-weights-gptq": {  # fitted once per CI run (about 3 minutes), then read from the cache
        "lambada_openai/acc": 28.333,
        "lambada_openai/perplexity": 64.317,
        "hellaswag/acc": 40.5,
        "hellaswag/acc_norm": 45.0,
    },
    "8bit-weights": {
        "lambada_openai/acc": 32.0,
        "lambada_openai/perplexity": 44.213,
        "hellaswag/acc": 41.0,
        "hellaswag/acc_norm": 48.0,
    },
}
ACCURACY_POINTS = 0.51  # absolute tolerance of accuracies: one document of either subset
PERPLEXITY_SHARE = 0.005  # relative tolerance of perplexities
# GPTQ rounds each weight to a code after spreading the rounding errors of the ones before it, so
# another CPU's BLAS and LAPACK rounding flips some codes: fitted and evaluated on an Intel Xeon,
# LAMBADA perplexity 64.317; on an AMD EPYC 64.848 (+0.83 %), while the unfitted presets agreed
# there within 0.5 %. Still far from min-max's 112.3 and from every planted defect.
FITTED_PERPLEXITY_SHARE = 0.015
# and the same flipped codes move an accuracy by two documents: HellaSwag acc_norm 44.0 fitted on
# an AMD EPYC Zen 5 against 45.0 pinned on an Intel Xeon.
FITTED_ACCURACY_POINTS = 1.01


def metrics(compression: str) -> Metrics:
    args = f"pretrained=smollm2-135m,dtype=float32,gpu_batch_size=16,num_gpu_batches=4,compression={compression}"
    measured: Metrics = {}
    for task, limit in SUBSETS.items():
        out = lm_eval.simple_evaluate(
            model="flexgen", model_args=args, tasks=[task], limit=limit, bootstrap_iters=0, task_manager=local_tasks()
        )
        results = out["results"][task]
        for name in ("acc", "acc_norm", "perplexity"):
            if f"{name},none" in results:
                value = results[f"{name},none"]
                measured[f"{task}/{name}"] = value * 100 if name.startswith("acc") else value
    return measured


def departures(
    measured: Metrics,
    pinned: Metrics,
    perplexity_share: float = PERPLEXITY_SHARE,
    accuracy_points: float = ACCURACY_POINTS,
) -> list[str]:
    """The metrics outside their tolerance of the pinned values."""
    out = []
    for key, expected in pinned.items():
        value = measured[key]
        allowed = expected * perplexity_share if key.endswith("perplexity") else accuracy_points
        if abs(value - expected) > allowed:
            out.append(f"{key}: {value:.3f}, pinned {expected:.3f} ± {allowed:.3f}")
    return out


def wrong_axis(param: Param, policy: Policy) -> CompressionConfig | None:
    """Groups along the input dimension of the matrices configured along their output dimension."""
    config = compression(param, policy)
    return replace(config, group_dim=1) if config is not None and config.group_dim == 0 else config


def lost_scale(q: Quantized, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantization that reads a zero scale: every value becomes its group's minimum."""
    return dequantize(replace(q, scale=torch.zeros_like(q.scale)), out)


def swapped_nibbles(q: Quantized, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each 4-bit code read from its neighbour's half of the byte."""
    return dequantize(replace(q, codes=(q.codes << 4) | (q.codes >> 4)), out)


DEFECTS: dict[str, tuple[str, Callable]] = {
    "wrong group axis": ("compression", wrong_axis),
    "lost scale": ("dequantize", lost_scale),
    "swapped nibbles": ("dequantize", swapped_nibbles),
}


def check(compression: str) -> None:
    fitted = compression.endswith("-gptq")
    share, points = (FITTED_PERPLEXITY_SHARE, FITTED_ACCURACY_POINTS) if fitted else (PERPLEXITY_SHARE, ACCURACY_POINTS)
    assert departures(metrics(compression), PINNED[compression], share, points) == []


@pytest.mark.parametrize("compression", list(PINNED))
def test_accuracy_stays_where_it_was_measured(compression: str) -> None:
    check(compression)


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_a_broken_quantizer_fails_the_pinned_values(defect: str, monkeypatch) -> None:
    name, broken = DEFECTS[defect]
    monkeypatch.setattr(placement, name, broken)
    with pytest.raises((AssertionError, ArithmeticError)):  # metrics moved, or so far that lm-eval overflows
        check("4bit-weights")


if __name__ == "__main__":  # measure the values to pin, and what each defect makes of them
    for preset in sys.argv[1:] or PINNED:
        print(preset, metrics(preset), flush=True)
    for defect, (name, broken) in DEFECTS.items():
        setattr(placement, name, broken)
        print(defect, metrics("4bit-weights"), flush=True)
        setattr(placement, name, {"compression": compression, "dequantize": dequantize}[name])
