"""glibc's heap, for a process that must stay within a RAM budget (no-ops on other C libraries).

Freed memory stays in glibc's heaps for reuse rather than going back to the system, so a
process's resident memory can sit well above the tensors it holds: loading streams several times
the model's bytes through short-lived tensors, and each scheduling unit leaves fragments of its
temporaries between the long-lived tensors it allocates (a layer's KV cache, the next unit's
hidden states). A run planned under a budget (`Policy.bound_heap`) has its large buffers mapped
on their own while it loads and its heaps trimmed whenever they have grown (`Heap`); other runs
keep glibc's defaults, which are faster.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_BYTES = 8 * 2**20  # while loading
COMPUTE_MMAP_THRESHOLD_BYTES = 32 * 2**20  # after: glibc's own largest
# resident growth that makes `Heap.settle` trim: within the cost model's allowance for the run's
# small objects (`cost_model.RUNTIME_BYTES`)
SLACK_BYTES = 32 * 2**20


def release_free_memory() -> None:
    """Give the memory that glibc keeps after frees back to the system, from every thread's heap
    and from free pages between live allocations, not only from the heaps' tops.

    The pages given back are faulted in again when the heap reuses them: trimming after every
    unit cost SmolLM2-135M's resident fp32 prefill 25 % and int4mm decoding of Qwen2.5-1.5B
    (32 rows) 58 %, hence `Heap`.
    """
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def map_large_buffers() -> None:
    """Have glibc serve every allocation of 8 MiB or more with its own mapping, returned to the
    system when freed.

    By default glibc raises that threshold to the size of the buffers a program frees, up to
    32 MiB, and then keeps such buffers in per-thread heaps, where fragments of one layer's
    activations outlive it: prefill of 4,096-token micro-batches through Qwen2.5-1.5B in bf16
    then peaked at 1.72 GiB where its tensors need 1.52; with the threshold fixed at 1 MiB the
    same run peaked at 1.42 GiB, at 8 MiB at 1.45 GiB (32 prompts x 128 + 16 under a 1.5 GiB
    limit; measured while the threshold held for computing too), as fast. The mappings cost page
    faults, though, and below 8 MiB they fall on dequantization's 4 MiB fp32 temporaries:
    decoding with 4-bit weights ran 5x slower at a 1 MiB threshold (Qwen2.5-1.5B, 8 rows: 4.6 s
    a step; 0.9 s at 8 MiB, as with glibc's default), and SmolLM2-135M's fp32 scoring, whose
    buffers are mostly 1-32 MiB, runs 8-13 % slower at 8 MiB; so only a run planned under a
    budget pays for them, and only while loading (see `reuse_compute_buffers`).
    """
    _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def reuse_compute_buffers() -> None:
    """After loading, have glibc map only buffers of 32 MiB or more on their own, as its default
    comes to, and keep up to twice that free at its heaps' tops, as its default does too: a
    layer's temporaries below that size are then reused from one unit and step to the next
    instead of being mapped and faulted in afresh each time, while `Heap` still trims what
    fragments leave. With the 8 MiB threshold kept for computing, SmolLM2-135M's fp32 generation
    (128 prompts x 128 + 8, 27.5 % of the weights on disk) took 36.2 and 35.1 s with 13-17 s of
    system time in page faults; with this, 29.6 and 31.5 s, as fast as an unbounded heap (29.9,
    31.0), at a peak RSS of 1.72 GiB (8 MiB throughout: 1.67; unbounded: 1.70). Qwen2.5-Coder-1.5B's
    bf16 generation under a 1.5 GiB limit (32 prompts x 128 + 16, weights mostly on disk) then
    peaked at 1.31-1.38 GiB, where 8 MiB throughout had peaked at 1.30-1.31."""
    _mallopt(M_MMAP_THRESHOLD, COMPUTE_MMAP_THRESHOLD_BYTES)
    _mallopt(M_TRIM_THRESHOLD, 2 * COMPUTE_MMAP_THRESHOLD_BYTES)


def _mallopt(parameter: int, value: int) -> None:
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(parameter, value)


class Heap:
    """Trims the heaps when the process's anonymous resident memory has grown by `SLACK_BYTES`
    since the last trim, rather than after every unit: a steady state (decoding, whose
    temporaries the heaps reuse step after step) then pays no page faults, while growth from
    fragments is cut back. Qwen2.5-Coder-1.5B's bf16 prefill (32 prompts x 128 tokens, weights
    mostly on disk): without trimming, resident memory rose layer by layer to 0.65 GiB above the
    live tensors; trimmed after every unit, it stayed 0.1 GiB above them."""

    def __init__(self, slack: int = SLACK_BYTES) -> None:
        self.slack = slack
        self.settled = _resident_anonymous()

    def settle(self) -> None:
        if _resident_anonymous() > self.settled + self.slack:
            release_free_memory()
            self.settled = _resident_anonymous()


def _resident_anonymous() -> int:
    """RssAnon of /proc/self/status in bytes (0 where there is none: the heap then never trims)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    for line in status.read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0
