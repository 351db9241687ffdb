"""Corrupt weights stop a run (issue 23's fourth check): NaN bytes in a checkpoint, and an offload
file overwritten while the engine runs. Each run must end with a non-zero exit and one line
naming the tensor (or layer), and report no accuracy.

1. the default model's GGUF file, copied, with one tensor's first block overwritten by 0xFF bytes
   (its fp16 scale becomes NaN), evaluated through the Hydra app;
2. a disk-offload run of the default model whose offload weight files are overwritten with
   0xFF bytes once the weights are written and scoring runs.

    python benchmarks/corrupt_weights.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gguf import GGUFReader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir  # noqa: E402

from flexeval.models import registry  # noqa: E402

TENSOR = "blk.3.ffn_down.weight"


def app(*args: str) -> subprocess.Popen:
    env = os.environ | {"FLEXEVAL_DATA_DIR": str(data_dir())}
    command = [sys.executable, "-m", "flexeval", "task=hellaswag", "limit=20", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def verdict(case: str, process: subprocess.Popen, out: Path) -> None:
    stdout, stderr = process.communicate()
    errors = [line[line.index("error: ") :] for line in stderr.splitlines() if "error: " in line]
    reported = (out / "results.json").is_file() or "acc_norm" in stdout
    print(f"| {case} | {process.returncode} | {len(errors)} | {'yes' if reported else 'no'} |")
    print(f"|  | {errors[0] if errors else stderr[-300:]} | | |")


def nan_checkpoint(tmp: Path) -> None:
    source = registry.resolve(registry.DEFAULT_MODEL) / "model.gguf"
    corrupt = tmp / "corrupt.gguf"
    shutil.copyfile(source, corrupt)
    (tensor,) = [t for t in GGUFReader(corrupt).tensors if t.name == TENSOR]
    with corrupt.open("r+b") as f:
        f.seek(int(tensor.data_offset))
        f.write(b"\xff" * 32)
    out = tmp / "nan-checkpoint"
    verdict(f"NaN bytes in {TENSOR}", app(f"model.pretrained={corrupt}", f"hydra.run.dir={out}"), out)
    shutil.rmtree(registry.resolve(str(corrupt)), ignore_errors=True)  # its header, read into the cache


def overwritten_offload_file(tmp: Path) -> None:
    offload, out = tmp / "offload", tmp / "overwritten"
    offload.mkdir()
    process = app("policy=disk-offload", f"hardware.offload_dir={offload}", f"hydra.run.dir={out}")
    files: list[Path] = []
    written, steady = -1, 0
    while process.poll() is None and steady < 10:  # the weights written: their size steady for 0.5 s
        files = sorted(offload.glob("flexeval-*/weights/*.bin"))
        size = sum(p.stat().st_size for p in files)
        steady, written = (steady + 1 if size == written and size else 0), size
        time.sleep(0.05)
    for path in files:
        with path.open("r+b") as f:
            f.write(b"\xff" * path.stat().st_size)
    verdict(f"{len(files)} offload weight files overwritten while scoring", process, out)


def main() -> None:
    print("| case | exit | error lines | accuracy reported |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        nan_checkpoint(Path(tmp))
        overwritten_offload_file(Path(tmp))


if __name__ == "__main__":
    main()
