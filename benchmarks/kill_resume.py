"""`kill -9` during a two-task suite after its first task finished, then `resume=<run dir>` (issue
23's third check): the first task is not computed again, the second only where the kill left it,
and the final metrics and every sample's answer equal an uninterrupted run's.

The suite runs through the Hydra app as a user runs it; the kill comes once the first task's
results are written and the second task has answered `--second-answers` requests (read from the
run's request log as it grows), so it lands inside the second task's computation.

    python benchmarks/kill_resume.py [--limit 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir  # noqa: E402

TASKS = ("boolq", "hellaswag")


def command(limit: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flexeval", f"task.tasks=[{','.join(TASKS)}]", f"limit={limit}", *extra]


def env() -> dict[str, str]:
    return os.environ | {"FLEXEVAL_DATA_DIR": str(data_dir())}


def answers(directory: Path) -> int:
    log = directory / "requests.jsonl"
    return log.read_bytes().count(b"\n") if log.is_file() else 0


def killed_run(limit: int, directory: Path, second_answers: int) -> tuple[int, float]:
    """Start the suite, kill it inside the second task; (answers logged, seconds) at the kill."""
    process = subprocess.Popen(
        command(limit, f"hydra.run.dir={directory}"), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    start = time.perf_counter()
    first: int | None = None
    while process.poll() is None:
        if first is None and (directory / f"results_{TASKS[0]}.json").is_file():
            first = answers(directory)
        if first is not None and answers(directory) >= first + second_answers:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return answers(directory), time.perf_counter() - start
        time.sleep(0.05)
    raise SystemExit(f"the suite ended (exit {process.returncode}) before the kill: raise --limit")


def samples(directory: Path, task: str) -> list:
    lines = (directory / f"samples_{task}.jsonl").read_text().splitlines()
    return [(s["doc_id"], s["resps"]) for s in map(json.loads, lines)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60, help="documents per task")
    parser.add_argument("--second-answers", type=int, default=40, help="the second task's answers before the kill")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        whole, killed = Path(tmp, "whole"), Path(tmp, "killed")
        subprocess.run(command(args.limit, f"hydra.run.dir={whole}"), env=env(), check=True, capture_output=True)
        logged, seconds = killed_run(args.limit, killed, args.second_answers)
        kept = sorted(p.name for p in killed.glob("results_*.json"))
        print(f"killed after {seconds:.1f} s: {logged} answers logged, finished: {', '.join(kept) or 'none'}")
        resumed = subprocess.run(command(args.limit, f"resume={killed}"), env=env(), capture_output=True, text=True)
        if resumed.returncode != 0:
            raise SystemExit(f"the resumed run failed:\n{resumed.stderr[-3000:]}")
        whole_results = json.loads((whole / "results.json").read_text())
        final = json.loads((killed / "results.json").read_text())
        kept_line = next((line for line in resumed.stdout.splitlines() if line.startswith("resume:")), "")
        print("\n| task | requests | computed by the resumed run | read back from the log | metrics equal |")
        print("|---|---|---|---|---|")
        for task in TASKS:
            total = whole_results["throughput"][task]["requests"]
            usage = final["throughput"][task]
            computed, read_back = (0, 0) if task in kept_line else (usage["requests"], usage["read_back_requests"])
            same = final["results"][task] == whole_results["results"][task]
            print(f"| {task} | {total} | {computed} | {read_back} | {same} |")
        equal = all(samples(killed, t) == samples(whole, t) for t in TASKS)
        print(f"\nevery sample's answer equal to the uninterrupted run's: {equal}")
        print(f"resumed run: {kept_line}")


if __name__ == "__main__":
    main()
