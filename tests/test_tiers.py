"""The tiers (`flexeval.engine.tiers`): shares distributed, bundles round-tripped bit for bit, rows
fetched and overwritten alone, disk buffers reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexeval.engine.tiers import DiskTier, MemoryTier, distribute
from tests.helpers import CPU


def test_distribute_tracks_shares_within_one_item() -> None:
    sizes = [3, 10, 3, 10, 3, 10, 7, 7, 1, 25]
    shares = (0.5, 0.3, 0.2)
    tiers = distribute(sizes, shares)
    for tier, share in enumerate(shares):
        placed = sum(s for s, t in zip(sizes, tiers) if t == tier)
        assert abs(placed - share * sum(sizes)) <= max(sizes)
    assert distribute([5] * 4, (0, 0, 1)) == [2, 2, 2, 2]
    assert distribute([5] * 4, (0.5, 0.5, 0)) == [0, 1, 0, 1]  # interleaved, not in runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8])
def test_tiers_round_trip_bit_for_bit(dtype: torch.dtype, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    bundle = {
        "a": (torch.randn(7, 13, generator=g) * 100).to(dtype),
        "b": (torch.randn(5000, generator=g) * 100).to(dtype),
    }
    tiers = [
        MemoryTier("compute", CPU, home=CPU),
        MemoryTier("cpu", CPU, home=CPU),
        DiskTier(tmp_path, CPU, durable=True),
        DiskTier(tmp_path, CPU),
    ]
    for tier in tiers:
        tier.put("x", bundle)
        fetched = tier.get("x")
        assert all(torch.equal(fetched.bundle[k], bundle[k]) for k in bundle)
        tier.release(fetched)
        in_place = isinstance(tier, MemoryTier)  # CPU-only: the memory tiers hand out their tensors
        assert tier.stats.bytes_written == (0 if in_place else sum(t.nbytes for t in bundle.values()))
        packed = sum(-(-t.nbytes // 64) * 64 for t in bundle.values())  # tensors 64-byte aligned in a file
        pages = -(-packed // 4096) * 4096  # read as whole aligned blocks
        assert tier.stats.bytes_read == (0 if in_place else pages)
        tier.evict("x")
        assert tier.stats.held == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "rows",
    [[0], [5, 6, 7, 8], [3, 900, 901, 1999], list(range(0, 2000, 7)), list(range(1200, 2000))],
    ids=["one", "contiguous", "scattered", "strided", "slice"],
)
def test_tiers_fetch_only_the_requested_rows(rows: list[int], tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    bundle = {"table": torch.randn(2000, 300, generator=g), "other": torch.randn(10, generator=g)}
    wanted = torch.tensor(rows)
    for tier in (MemoryTier("compute", CPU, home=CPU), DiskTier(tmp_path, CPU, durable=True)):
        tier.put("x", bundle)
        fetched = tier.get("x", {"table": wanted})
        assert torch.equal(fetched.bundle["table"], bundle["table"][wanted])
        assert torch.equal(fetched.bundle["other"], bundle["other"])
        if isinstance(tier, DiskTier):  # only the pages holding those rows (and small gaps) are read
            assert tier.stats.bytes_read <= 4096 + (rows[-1] - rows[0] + 3) * 1200 + 4096
        tier.release(fetched)
        tier.evict("x")


def test_tiers_overwrite_only_the_rows_given(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    bundle = {"table": torch.randn(500, 64, generator=g), "other": torch.randn(10, generator=g)}
    index = torch.tensor([3, 4, 5, 200, 499])  # a run of three, two alone
    new = torch.randn(5, 64, generator=g)
    expected = bundle["table"].clone()
    expected[index] = new
    for tier in (MemoryTier("cpu", CPU, home=CPU), DiskTier(tmp_path, CPU)):
        tier.put("x", {n: t.clone() for n, t in bundle.items()})
        tier.write_rows("x", {"table": (index, new)})
        fetched = tier.get("x")
        assert torch.equal(fetched.bundle["table"], expected) and torch.equal(fetched.bundle["other"], bundle["other"])
        assert tier.stats.bytes_written == (0 if tier.in_place else 500 * 64 * 4 + 10 * 4 + new.nbytes)
        tier.release(fetched)
        tier.evict("x")


def test_disk_reads_reuse_their_buffers(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, CPU)
    tier.put("small", {"w": torch.ones(1000)})
    tier.put("big", {"w": torch.ones(2_000_000)})
    for _ in range(3):
        for key in ("small", "big"):
            tier.release(tier.get(key))
    assert len(tier.pool._free) == 2
