"""What `policy=auto` predicts for a task's own workload, against what the run then measures (issue
22's fifth check: within ±35 % on PIQA and HellaSwag).

Each task runs `--repeats` times through the Hydra app, as a user runs it (`python -m flexeval
task=... policy=auto`), each in a fresh process under a RAM budget of `--cpu-mem-gb`; the search
plans for the task's counted requests and `results.json` records its prediction beside the
measured throughput. Printed per run: the chosen block shape, predicted and measured tokens/s
(the task's wall seconds, lm-eval's own work included) and the engine's compute seconds beside
the predicted seconds; then per task the median of the predicted-over-measured ratios.

    python benchmarks/auto_prediction.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir  # noqa: E402


def run(task: str, limit: int, cpu_mem_gb: float, directory: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "flexeval",
        f"task={task}",
        f"limit={limit}",
        "policy=auto",
        f"hardware.cpu_mem_gb={cpu_mem_gb}",
        f"hydra.run.dir={directory}",
    ]
    env = os.environ | {"FLEXEVAL_DATA_DIR": str(data_dir())}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((directory / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["piqa", "hellaswag"])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--cpu-mem-gb", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'task':<12}{'block':>8}{'predicted tok/s':>17}{'measured':>10}{'ratio':>8}{'pred s':>9}{'compute s':>11}")
    with tempfile.TemporaryDirectory() as scratch:
        for task in args.tasks:
            ratios = []
            for r in range(args.repeats):
                results = run(task, args.limit, args.cpu_mem_gb, Path(scratch) / f"{task}-{r}")
                predicted, measured = results["prediction"], results["throughput"][task]
                policy = results["policy"]
                ratios.append(predicted["tokens_per_second"] / measured["tokens_per_second"])
                block = f"{policy['gpu_batch_size']}x{policy['num_gpu_batches']}"
                print(
                    f"{task:<12}{block:>8}{predicted['tokens_per_second']:>17.0f}{measured['tokens_per_second']:>10.0f}"
                    f"{ratios[-1]:>8.2f}{predicted['seconds']:>9.2f}{measured['compute_seconds']:>11.2f}",
                    flush=True,
                )
            print(f"{task}: median predicted/measured {statistics.median(ratios):.2f} over {args.repeats} runs")


if __name__ == "__main__":
    main()
