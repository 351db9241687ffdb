"""`kill -9` at moments of a disk-offload run, each followed by a rerun on a disk just big enough
for one run (issue 23's second check): every rerun succeeds and leaves nothing behind.

Killed runs evaluate `--limit` documents, so that each is still running when killed; reruns
`--rerun-limit`, as many as one uninterrupted run that sizes the disk. The offload directory is
a tmpfs sized to `--headroom` times the most one uninterrupted run holds
in it (measured first, polling its size), so a killed run's leftovers and a second run do not fit
together: a rerun succeeds only if it reclaims what the killed run left. Needs root (mount).

    sudo python benchmarks/kill_offload.py [--at 2 5 10 20 40]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir  # noqa: E402

MB = 2**20


def command(offload: Path, out: Path, limit: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flexeval",
        "task=hellaswag",
        f"limit={limit}",
        "policy=disk-offload",
        f"hardware.offload_dir={offload}",
        f"hydra.run.dir={out}",
    ]


def used(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def run(offload: Path, out: Path, limit: int, kill_at: float | None = None) -> tuple[int, int, str]:
    """(exit status, the most bytes held in `offload`, what the run said about reclaiming)."""
    env = os.environ | {"FLEXEVAL_DATA_DIR": str(data_dir())}
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command(offload, out, limit), env=env, stdout=log, stderr=subprocess.STDOUT)
        start, most = time.perf_counter(), 0
        while process.poll() is None:
            most = max(most, used(offload))
            if kill_at is not None and time.perf_counter() - start >= kill_at:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(0.05)
        log.seek(0)
        text = log.read()
    said = next((line.split("] - ")[-1] for line in text.splitlines() if "reclaimed" in line), "")
    if process.returncode not in (0, -signal.SIGKILL):
        print(text[-3000:], file=sys.stderr)
    return process.returncode, most, said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", type=float, nargs="+", default=[2, 5, 10, 20, 40], help="seconds into a run")
    parser.add_argument("--limit", type=int, default=2000, help="hellaswag documents of a killed run (it runs on)")
    parser.add_argument("--rerun-limit", type=int, default=20, help="hellaswag documents of a rerun")
    parser.add_argument("--headroom", type=float, default=1.3, help="the disk, over one run's need")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch, mount, out = Path(tmp, "scratch"), Path(tmp, "disk"), Path(tmp, "out")
        scratch.mkdir()
        mount.mkdir()
        code, need, _ = run(scratch, out / "first", args.rerun_limit)
        if code != 0:
            raise SystemExit("the uninterrupted run failed")
        size = int(need * args.headroom)
        print(f"one run holds {need / MB:.0f} MB in its offload directory; the disk: {size / MB:.0f} MB")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
        try:
            print("\n| kill at s | left by the kill MB | rerun exit | rerun said | left after the rerun MB |")
            print("|---|---|---|---|---|")
            for n, at in enumerate(args.at):
                run(mount, out / f"killed-{n}", args.limit, kill_at=at)
                left = used(mount)
                code, _, said = run(mount, out / f"rerun-{n}", args.rerun_limit)
                print(f"| {at:g} | {left / MB:.0f} | {code} | {said or '-'} | {used(mount) / MB:.0f} |")
        finally:
            subprocess.run(["umount", str(mount)], check=True)
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
