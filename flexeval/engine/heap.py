"""glibc's heap, for a process that must stay within a RAM budget (no-ops on other C libraries).

Freed memory stays in glibc's heaps for reuse rather than going back to the system, so a
process's resident memory can sit well above the tensors it holds: loading streams several times
the model's bytes through short-lived tensors, and each scheduling unit leaves fragments of its
temporaries between the long-lived tensors it allocates (a layer's KV cache, the next unit's
hidden states). A run planned under a budget (`Policy.bound_heap`) has its large buffers mapped
on their own and the heaps trimmed after every unit; other runs keep glibc's defaults, which
are faster.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 8 * 2**20


def release_free_memory() -> None:
    """Give the memory that glibc keeps after frees back to the system, from every thread's heap
    and from free pages between live allocations, not only from the heaps' tops.

    Trimming after each unit of Qwen2.5-Coder-1.5B's bf16 prefill (32 prompts x 128 tokens,
    weights mostly on disk) kept resident memory 0.1 GiB above the live tensors where without it
    the gap grew layer by layer to 0.65 GiB, at no measurable cost in speed; on SmolLM2-135M's
    resident fp32 prefill, whose units are short and whose temporaries are then faulted back in,
    it cost 25 %.
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
    limit), as fast. The mappings cost page faults, though, and below 8 MiB they fall on
    dequantization's 4 MiB fp32 temporaries: decoding with 4-bit weights ran 5x slower at a
    1 MiB threshold (Qwen2.5-1.5B, 8 rows: 4.6 s a step; 0.9 s at 8 MiB, as with glibc's
    default), and SmolLM2-135M's fp32 scoring, whose buffers are mostly 1-32 MiB, runs 8-13 %
    slower at 8 MiB; so only a run planned under a budget pays for them.
    """
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
