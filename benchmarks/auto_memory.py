"""policy=auto's RAM against its budget, from a tenth of the weights to twice them (issue 7, check 3).

A random 134 MB Llama (`flexeval.models.tiny.WIDE_LLAMA`); for each budget a fresh process
(`python -m flexeval.auto_memory`) searches a policy (16 sequences of 64 tokens generating 8; the
budget split evenly between the compute and CPU tiers, both RAM here), loads the model under it
and generates, and reports its resident high-water mark over what it held before loading; a
budget nothing fits reports the error, which names the smallest feasible budget, and that one is
run instead. Each budget runs `--repeats` times: the allocator's layout differs between
processes (address-space randomisation), and the same policy's peak with it, by up to 40 MB
here; the worst run counts.

    python benchmarks/auto_memory.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from flexeval.models import registry
from flexeval.models.tiny import WIDE_LLAMA, write
from flexeval.planning.search import GB

ROOT = Path(__file__).resolve().parents[1]


def run(directory: Path, budget: float, offload: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "flexeval.auto_memory", str(directory), str(budget), offload],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", type=float, nargs="*", default=[0.1, 0.15, 0.25, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "wide-llama"
        write(*WIDE_LLAMA, directory)
        weights = registry.build_model(directory).nbytes(torch.float32)
        print(f"{'share':>6}{'budget MB':>11}{'median MB':>11}{'max MB':>8}{'max/budget':>12}  policy")
        for share in args.shares:
            budget = share * weights
            outcome = run(directory, budget, scratch)
            if "error" in outcome:
                print(f"{share:>6.2f}{budget / 2**20:>11.1f}  refused: {outcome['error']}")
                named = 2 * float(outcome["error"].split("gpu_mem_gb=")[-1].split(",")[0]) * GB
                budget, outcome = named, run(directory, named, scratch)
            peaks = [outcome["peak"]] + [run(directory, budget, scratch)["peak"] for _ in range(args.repeats - 1)]
            print(
                f"{'':>6}{budget / 2**20:>11.1f}{statistics.median(peaks) / 2**20:>11.1f}{max(peaks) / 2**20:>8.1f}"
                f"{max(peaks) / budget:>12.2f}  {outcome['policy'].split(';')[0]}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
