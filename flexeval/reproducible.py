"""CPU results that do not depend on the batch they were computed in.

Intel MKL, torch's CPU BLAS, chooses GEMM kernels and splits work between threads by the number
of rows, so a row's product changes in its last bits with the rows that came with it: a
sequence scored among four others would differ from the same sequence scored alone. MKL's
strict conditional numerical reproducibility mode (`MKL_CBWR=AUTO,STRICT`) makes every row's
result independent of the others, for about 3 % of GEMM speed here. MKL reads the mode once, at
its first call, so flexeval sets it on import, unless the user chose a mode, which is why this
module must be imported before torch computes anything. Together with attention over unpadded
columns (`flexeval.models.attention`), a sequence's fp32 results are then bitwise the same under
every batch shape and placement.
"""

from __future__ import annotations

import logging
import os
from functools import cache

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402 - MKL's mode must be in the environment before torch's first GEMM

log = logging.getLogger(__name__)


@cache
def gemm_rows_are_independent() -> bool:
    """Whether a row's GEMM product is the same alone as among many rows (probed, once)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 1536, generator=g), torch.randn(576, 1536, generator=g)
    together = torch.nn.functional.linear(x, w)
    return all(torch.equal(torch.nn.functional.linear(x[:m], w), together[:m]) for m in (1, 5, 64, 200))


def check_cpu_gemms() -> None:
    """Warn, once, when batch-shape independence is not on offer in this process."""
    if not gemm_rows_are_independent():
        log.warning(
            "CPU matrix products in this process depend on batch shape (MKL_CBWR=%s), so results may differ "
            "in their last bits between policies: import flexeval before running torch computations, or "
            "start Python with MKL_CBWR=AUTO,STRICT",
            os.environ.get("MKL_CBWR"),
        )
