"""Peak memory while loading a model with every weight on disk, against transformers' loader.

Each load runs in its own process under `/usr/bin/time -v`, whose "Maximum resident set size" is
the figure printed: flexeval's `Engine.load` with all weights placed on disk (the load streams
the checkpoint tensor by tensor into the offload files), and, with `--peer`, transformers'
`from_pretrained` of the same checkpoint (for a GGUF model: the same file, dequantized whole).
Also printed: the interpreter's own footprint (flexeval imported, nothing loaded), the largest
tensor, and the weights' bytes, so that the peak can be read as footprint + largest tensor.

    python benchmarks/load_memory.py --model qwen2.5-coder-1.5b --peer
    python benchmarks/load_memory.py --model qwen2.5-coder-1.5b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

CHILD = {
    "footprint": "import flexeval, torch, transformers",
    "flexeval": (
        "from flexeval import Engine, Policy\n"
        "Engine.load({model!r}, dtype={dtype!r}, policy=Policy(w_gpu_percent=0, w_cpu_percent=0)).close()"
    ),
    "transformers": (
        "import torch\n"
        "from flexeval.models import registry\n"
        "registry.hf_model(registry.resolve({model!r}), getattr(torch, {dtype!r}))"
    ),
}


def peak_rss(code: str) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of a fresh interpreter running `code`."""
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return kib / 2**20, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--peer", action="store_true", help="also measure transformers' from_pretrained")
    args = parser.parse_args()

    from flexeval.engine.device import DTYPES
    from flexeval.models import registry

    model = registry.build_model(registry.resolve(args.model))  # prepares (converts) once, outside the timing
    params = [p for layer in model.layers for p in layer.params.values()]
    dtype = DTYPES[args.dtype]
    largest = max(p.nbytes(dtype) for p in params) / 2**30
    weights = model.nbytes(dtype) / 2**30
    print(f"{args.model} in {args.dtype}: {weights:.2f} GiB of weights, largest tensor {largest:.3f} GiB")
    systems = ["footprint", "flexeval"] + (["transformers"] if args.peer else [])
    print(f"{'process':<34}{'peak RSS GiB':>14}{'seconds':>10}")
    for system in systems:
        rss, seconds = peak_rss(CHILD[system].format(model=args.model, dtype=args.dtype))
        label = {
            "footprint": "interpreter + libraries",
            "flexeval": "flexeval, all weights on disk",
            "transformers": "transformers from_pretrained",
        }[system]
        print(f"{label:<34}{rss:>14.2f}{seconds:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
