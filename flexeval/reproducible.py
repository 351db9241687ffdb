"""CPU results that do not depend on the batch they were computed in.

A sequence scored among four others must get the very bits it gets scored alone, or a policy
would change an evaluation's numbers. Two things can break that in a matrix product of a
variable number of rows (every projection, the MLP, the unembedding's chunks):

- Intel MKL, torch's CPU BLAS, splits work between threads by the number of rows. Its strict
  conditional numerical reproducibility mode (`MKL_CBWR=AUTO,STRICT`, about 3 % of GEMM speed)
  stops that; MKL reads the mode once, at its first call, so `import flexeval` sets it unless
  the user chose a mode, which is why flexeval must be imported before torch computes anything.
- Even in strict mode, a BLAS may compute a product of very few rows with other kernels than
  the same rows among more: MKL on AMD EPYC (Zen 4) rounds products of 1, 2 or 3 fp32 rows
  differently from 4 or more, in every mode; on Intel Xeon every row count agrees. Padding such
  a product with zero rows up to the machine's safe minimum, and dropping them after, restores
  invariance (`flexeval.models.common.linear` does it; `Step.gemm_rows` carries the minimum).

The minimum is not hard-coded: `safe_gemm_rows` probes the model's own product shapes on this
machine once (cached under the flexeval cache, keyed by CPU, threads, torch, MKL mode, dtype and
shapes) and warns, once, only when no padding helps. Together with attention over unpadded
columns (`flexeval.models.attention`, whose products have a row count fixed by the model), a
sequence's results are then bitwise the same under every batch shape and placement. On CUDA,
cuBLAS picks kernels by shape; results there agree to float32 rounding, so nothing is probed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from flexeval.atomic import write_text

log = logging.getLogger(__name__)

PROBE_VERSION = 1  # of the procedure below: a new one invalidates cached results
# Row counts compared against the same rows of a PROBE_ROWS-row product: every count up to the
# largest padding considered, then a spread up to where work splits between threads.
MOST_PADDED_ROWS = 16
PROBE_ROWS = 128
PROBED_COUNTS = (*range(1, MOST_PADDED_ROWS + 1), 24, 33, 64, 100, 127)
# Output columns probed at most: a vocabulary-wide product would cost seconds and hundreds of
# megabytes of random weights. Measured on AMD EPYC (fp32, depths 64 to 4,096): narrow products
# follow rules of their own (16 columns: rows 1-15 differ; 17-23 columns: no padding helps), but
# from 24 columns to 49,152 the same rows 1-3 differ at every width tried.
PROBED_WIDTH = 4096

Shape = tuple[int, int]  # (in_features, out_features) of a product's weight


def cpu_model() -> str:
    """The CPU's name with its family and model numbers: virtual machines often name only the
    vendor's line ("AMD EPYC" for Zen 4 and Zen 5 alike), whose cores choose other kernels."""
    try:
        return describe_cpu(Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor()


def describe_cpu(cpuinfo: str) -> str:
    """`cpu_model` from the text of /proc/cpuinfo (its first processor's block)."""
    first = cpuinfo.split("\n\n", 1)[0]
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    name = fields.get("model name") or platform.processor()
    numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if fields.get(k)]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def safe_gemm_rows(shapes: Iterable[Shape], dtype: torch.dtype, device: torch.device, cache_dir: Path) -> int:
    """The fewest rows this machine's products of these shapes must be computed with for each
    row's result not to depend on the rows beside it: 1 when every count already agrees.

    Probed once per machine, torch, MKL mode, dtype and shapes, and cached as JSON in `cache_dir`.
    When no padding up to MOST_PADDED_ROWS restores invariance, warns (once a process) and
    returns 1: padding would cost speed and buy nothing."""
    if device.type != "cpu":
        return 1
    shapes = sorted(set(shapes))
    facts = [PROBE_VERSION, cpu_model(), torch.get_num_threads(), torch.__version__]
    facts += [os.environ.get("MKL_CBWR"), str(dtype), shapes]
    path = cache_dir / "reproducible" / f"gemm-rows-{hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]}.json"
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        rows = probe_gemm_rows(shapes, dtype, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"rows": rows, "facts": facts}) + "\n")
    if rows is None:
        _warn_once(str(dtype))
        return 1
    return int(rows)


def probe_gemm_rows(shapes: Iterable[Shape], dtype: torch.dtype, device: torch.device) -> int | None:
    """`safe_gemm_rows` measured now: the least row count that works for every shape, or None."""
    needed = 1
    for k, n in shapes:
        rows = _shape_rows(k, min(n, PROBED_WIDTH), dtype, device)
        if rows is None:
            return None
        needed = max(needed, rows)
    return needed


def _shape_rows(k: int, n: int, dtype: torch.dtype, device: torch.device) -> int | None:
    """The least r such that every probed count of at least r rows agrees with the same rows of
    a larger product, and every count below r does once padded with zero rows to r."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(PROBE_ROWS, k, generator=g, device=device).to(dtype)
    w = torch.randn(n, k, generator=g, device=device).to(dtype)
    together = F.linear(x, w)

    def agrees(m: int, rows: int) -> bool:
        part = x[:m] if m >= rows else torch.cat((x[:m], x.new_zeros(rows - m, k)))
        return torch.equal(F.linear(part, w)[:m], together[:m])

    differing = [m for m in PROBED_COUNTS if not agrees(m, m)]
    for rows in range(max(differing, default=0) + 1, MOST_PADDED_ROWS + 1):
        if all(agrees(m, rows) for m in range(1, rows)):
            return rows
    return None


@cache
def _warn_once(dtype: str) -> None:
    mode = os.environ.get("MKL_CBWR")
    fix = (
        "start Python with MKL_CBWR=AUTO,STRICT (or import flexeval before torch computes anything)"
        if mode != "AUTO,STRICT"
        else "compare runs with a tolerance, or run on a CPU whose BLAS has a reproducible mode"
    )
    log.warning(
        "CPU matrix products (%s) here depend on how many rows they are computed with, even padded to %d rows "
        "(MKL_CBWR=%s), so a sequence's results may differ in their last bits between batch shapes and policies: %s",
        dtype,
        MOST_PADDED_ROWS,
        mode,
        fix,
    )
