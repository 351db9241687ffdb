"""The runtime: a model streamed through tiers block by block (FlexGen's zig-zag schedule).

`Engine` loads a model under a `Policy` and scores or generates; `device` resolves where and in
which dtype it computes. The modules beneath: `schedule` (the block schedule and its I/O
overlap), `placement` (which tier holds each tensor), `tiers` (GPU, CPU and disk behind one copy
function), `kv_cache`, `batch` (padding and positions), `generation` (decoding state),
`readout` (logits reduced as they stream), `heap` (buffer reuse), `finite` (non-finite values
named by layer). Imports point down only: `quantization` and `models` below, `planning` above.
"""

from flexeval.lazy import exports

__all__, __getattr__ = exports(
    __name__,
    {
        ".engine": ("Engine", "RunStats", "Scored"),
        ".policy": ("Policy",),
        ".device": ("resolve_device", "resolve_dtype"),
    },
)
