"""Accuracy of compressed SmolLM2-135M against uncompressed, through the same engine (issue 6).

Each configuration runs every task through `lm_eval.simple_evaluate` with the `flexgen` backend
(fp32, all resident); the table puts each metric, with the stored bits per weight (fp32 scale and
minimum per group), next to the uncompressed run and to what a simulation measured
(FlexGen's quantizer applied to the weights inside transformers, lm-eval's `hf` backend), which
4-bit weights (groups of 64 along the output dimension) should reproduce.

    python benchmarks/compression_accuracy.py                               # about 90 minutes on 2 cores
    python benchmarks/compression_accuracy.py --configs none 4bit-weights --tasks lambada_openai:200

`--through-cache` scores every continuation token through a decoding step against the KV cache
(the backend's `score_through_cache`), where a compressed cache acts; one-pass scoring keeps none.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from flexeval import Policy
from flexeval.engine.policy import compression_fields
from flexeval.quantization.compression import quantized_nbytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evaluate_task  # noqa: E402

CONFIGS = {  # label -> model_args
    "none": "compression=none",
    "4bit-weights": "compression=4bit-weights",
    "8bit-weights": "compression=8bit-weights",
    "4bit": "compression=4bit",
    "8bit": "compression=8bit",
    "4bit-cache": "compression=4bit-cache",
    "4bit-weights-input": "compression=4bit-weights-input",
    "4bit-weights-gptq": "compression=4bit-weights-gptq",
    "4bit-g128-input": "compression=4bit-weights,comp_weight_config=4:128:1",
    "4bit-mse": "compression=4bit-weights,comp_weight_config=4:64:0:mse",
    "4bit-g64-input-mse": "compression=4bit-weights,comp_weight_config=4:64:1:mse",
    "4bit-g128-input-mse": "compression=4bit-weights,comp_weight_config=4:128:1:mse",
    "4bit-g128-output-mse": "compression=4bit-weights,comp_weight_config=4:128:0:mse",
}
TASKS = ["hellaswag:1000", "lambada_openai:1000", "piqa:1000", "arc_easy:1000", "wikitext:20"]
METRICS = {  # task -> metrics reported, higher-is-better ones in points
    "hellaswag": ["acc_norm"],
    "lambada_openai": ["acc", "perplexity"],
    "piqa": ["acc_norm"],
    "arc_easy": ["acc_norm"],
    "wikitext": ["word_perplexity"],
}
SIMULATION = {  # the reference: uncompressed -> FlexGen 4-bit weights (g64, output dimension)
    ("hellaswag", "acc_norm"): (43.1, 41.9),
    ("lambada_openai", "acc"): (29.7, 16.0),
    ("lambada_openai", "perplexity"): (50.8, 149.7),
    ("piqa", "acc_norm"): (66.0, 62.1),
    ("arc_easy", "acc_norm"): (46.9, 44.1),
    ("wikitext", "word_perplexity"): (31.7, 50.9),
}


def bits_per_weight(model_args: str) -> float:
    """Stored bits per weight of a SmolLM2 matrix (576 x 1536, fp32) under these model_args."""
    fields = dict(item.split("=", 1) for item in model_args.split(","))
    policy = Policy.from_dict(compression_fields(fields.pop("compression")) | fields)
    if not policy.compress_weight:
        return 32.0
    return 8 * quantized_nbytes((576, 1536), torch.float32, policy.comp_weight_config) / (576 * 1536)


def evaluate(model_args: str, task: str, limit: int, through_cache: bool) -> dict[str, float]:
    args = f"pretrained=smollm2-135m,dtype=float32,gpu_batch_size=16,num_gpu_batches=4,{model_args}"
    args += ",score_through_cache=True" if through_cache else ""
    out = evaluate_task("flexgen", args, task, limit)
    results = out["results"][task]
    return {m: results[f"{m},none"] * (100 if m.startswith("acc") else 1) for m in METRICS[task]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="task:limit")
    parser.add_argument("--through-cache", action="store_true", help="score through decoding steps")
    args = parser.parse_args()

    measured: dict[tuple[str, str, str], float] = {}
    for spec in args.tasks:
        task, _, limit = spec.partition(":")
        for config in args.configs:
            start = time.perf_counter()
            values = evaluate(CONFIGS[config], task, int(limit), args.through_cache)
            for metric, value in values.items():
                measured[config, task, metric] = value
            shown = "  ".join(f"{metric} {value:.2f}" for metric, value in values.items())
            print(f"{config:<22}{spec:<22}{time.perf_counter() - start:>6.0f} s  {shown}", flush=True)  # kept if cut

    how = "scored through decoding steps (KV cache)" if args.through_cache else "scored in one pass"
    print(f"\nSmolLM2-135M fp32 through flexgen, {how}; acc in points. sim: the issue's transformers simulation")
    header = f"{'task':<22}{'metric':<17}{'config':<22}{'bits':>6}{'value':>9}{'vs none':>9}"
    print(f"{header}{'sim none':>9}{'sim 4bit':>9}")
    for spec in args.tasks:
        task = spec.partition(":")[0]
        for metric in METRICS[task]:
            base = measured.get(("none", task, metric))
            sim = SIMULATION.get((task, metric), (float("nan"), float("nan")))
            for config in args.configs:
                value = measured[config, task, metric]
                delta = f"{value - base:>+9.2f}" if base is not None else f"{'':>9}"
                bits = bits_per_weight(CONFIGS[config])
                print(f"{spec:<22}{metric:<17}{config:<22}{bits:>6.2f}{value:>9.2f}{delta}{sim[0]:>9.1f}{sim[1]:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
