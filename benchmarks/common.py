"""Helpers shared by the benchmark scripts: their options, where the shared data is, real text to feed, memory."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flexeval.data import data_dir

__all__ = [
    "Limited",
    "options",
    "drop_page_cache",
    "run_limited",
    "spawn_measured",
    "data_dir",
    "dense_checkpoint",
    "evaluate_task",
    "generate_from_disk",
    "hf_generate",
    "prompt_windows",
    "rss_bytes",
    "wikitext_pages",
    "wikitext_tokens",
]

WIKITEXT = "wikitext2/wikitext_document_level-2-raw-v1_test.jsonl"


def options(
    description: str | None,
    *,
    model: str | None = None,
    prompts: int | None = None,
    prompt_tokens: int | None = None,
    new_tokens: int | None = None,
    sequences: int | None = None,
    tokens: int | None = None,
    gpu_batch_size: int | None = None,
    num_gpu_batches: int | None = None,
    repeats: int | None = None,
    data: bool = True,
) -> argparse.ArgumentParser:
    """A benchmark's command line with the options the scripts share: each option whose default
    is given (`--model`, `--prompts`, `--prompt-tokens`, ...), and `--data-dir` (the shared
    benchmark data, `$FLEXEVAL_DATA_DIR`) unless `data` is false. The script adds its own."""
    made = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model is not None:
        made.add_argument("--model", default=model)
    counts = {
        "--prompts": prompts,
        "--prompt-tokens": prompt_tokens,
        "--new-tokens": new_tokens,
        "--sequences": sequences,
        "--tokens": tokens,
        "--gpu-batch-size": gpu_batch_size,
        "--num-gpu-batches": num_gpu_batches,
        "--repeats": repeats,
    }
    for flag, default in counts.items():
        if default is not None:
            made.add_argument(flag, type=int, default=default)
    if data:
        made.add_argument("--data-dir", type=Path, default=data_dir())
    return made


def dense_checkpoint(spec: str, dtype: str = "float32") -> Path:
    """A safetensors checkpoint directory of a model in `dtype`, for peers that only read those
    (Accelerate's disk offload memory-maps one): a GGUF model's weights dequantized, or a dummy
    model's generated weights, written once into the flexeval cache a tensor at a time (shards of
    at most SHARD_BYTES, so that a 7B model never sits in memory whole)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from flexeval.atomic import atomic_directory
    from flexeval.models import registry
    from flexeval.models.checkpoint import open_checkpoint
    from flexeval.models.dummy import is_dummy
    from flexeval.models.gguf import is_prepared

    source = registry.resolve(spec)
    if not (is_prepared(source) or is_dummy(source)):
        return source
    target = registry.cache_root() / "dense" / f"{source.name}-{dtype}"
    if target.is_dir():
        return target
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        names = list(AutoModelForCausalLM.from_config(config).state_dict())
    if config.tie_word_embeddings:
        names.remove("lm_head.weight")
    checkpoint = open_checkpoint(source)
    with atomic_directory(target) as scratch:
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}

        def write_shard() -> None:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(scratch / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard.clear()

        for name in names:
            shard[name] = checkpoint.get(checkpoint.resolve(name), getattr(torch, dtype)).contiguous()
            if sum(t.nbytes for t in shard.values()) >= SHARD_BYTES:
                write_shard()
        if shard:
            write_shard()
        index = {"metadata": {}, "weight_map": weight_map}
        (scratch / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dense now: loaders must not treat it as GGUF
        config.torch_dtype = dtype
        config.save_pretrained(scratch)
        registry.load_tokenizer(source).save_pretrained(scratch)
    return target


SHARD_BYTES = 2 * 10**9


def wikitext_pages(directory: Path, limit: int | None = None) -> list[str]:
    path = directory / WIKITEXT
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data-dir pointing at the shared benchmark data")
    with path.open() as f:
        return [json.loads(line)["page"] for line, _ in zip(f, range(limit or 10**9))]


def wikitext_tokens(tokenizer, directory: Path, count: int) -> list[int]:
    """The first `count` tokens of WikiText-2's test documents, concatenated: real text to score."""
    tokens: list[int] = []
    for page in wikitext_pages(directory):
        tokens += tokenizer(page, add_special_tokens=False).input_ids
        if len(tokens) >= count:
            return tokens[:count]
    raise SystemExit(f"WikiText-2 has fewer than {count} tokens")


def prompt_windows(tokenizer, directory: Path, count: int, length: int) -> torch.Tensor:
    """(count, length) prompts: consecutive windows of WikiText-2 text."""
    return torch.tensor(wikitext_tokens(tokenizer, directory, count * length)).view(count, length)


def generate_from_disk(
    policy, directory: Path, count: int, length: int, new_tokens: int, model: str | None = None, dtype="float32"
):
    """A model (default SmolLM2) generating exactly `new_tokens` for each prompt window, with a
    fresh engine whose disk tier lives in a temporary directory: (seconds, generated tokens, the
    engine's RunStats)."""
    from flexeval import Engine
    from flexeval.models import registry

    with tempfile.TemporaryDirectory() as offload:
        engine = Engine.load(model or registry.DEFAULT_MODEL, policy=policy, offload_dir=offload, dtype=dtype)
        ids = prompt_windows(engine.tokenizer, directory, count, length)
        start = time.perf_counter()
        out = engine.generate(list(ids), max_new_tokens=new_tokens, stop_token_ids=[])
        seconds = time.perf_counter() - start
        engine.close()
    assert all(len(o) == new_tokens for o in out)
    return seconds, out, engine.stats


def hf_generate(model, ids: torch.Tensor, batch_size: int, new_tokens: int) -> float:
    """Seconds for a transformers model to generate exactly `new_tokens` greedy tokens for each row
    of `ids`, `batch_size` rows at a time."""
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(ids), batch_size):
            batch = ids[b : b + batch_size]
            out = model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
            assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def evaluate_task(model: str, model_args: str, task: str, limit: int | None, **kwargs) -> dict:
    """lm-eval's `simple_evaluate` on one of this repository's tasks (local data), without
    bootstrapped standard errors: what the benchmarks compare."""
    import lm_eval

    from flexeval.data import local_tasks

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        limit=limit,
        bootstrap_iters=0,
        task_manager=local_tasks(),
        **kwargs,
    )


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


@dataclass
class Limited:
    """A child process's end under a memory cgroup: its output and the cgroup's peak (page cache
    included: what a machine with that much memory would have had to hold)."""

    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int
    oom_killed: bool
    timed_out: bool = False


def run_limited(cmd: list[str], limit_bytes: int, timeout: float | None = None) -> Limited:
    """Run `cmd` in a fresh memory cgroup limited to `limit_bytes` (v1 `memory.limit_in_bytes`,
    v2 `memory.max`; needs root), the child joining it before it executes anything; killed
    after `timeout` seconds, if given (a peer that thrashes under the limit may never finish)."""
    v1 = CGROUP_V1.is_dir() and (CGROUP_V1 / "memory.limit_in_bytes").exists()
    group = (CGROUP_V1 if v1 else CGROUP_V2) / f"flexeval-bench-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
    except OSError as err:
        raise SystemExit(f"cannot create the memory cgroup {group} ({err.strerror}): run as root") from err
    try:
        (group / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit_bytes))
        if v1:
            (group / "memory.swappiness").write_text("0")
        procs = group / "cgroup.procs"
        timed_out = False
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                check=False,
                timeout=timeout,
                preexec_fn=lambda: procs.write_text(str(os.getpid())),
            )
        except subprocess.TimeoutExpired as expired:
            done = subprocess.CompletedProcess(cmd, -9, _text(expired.stdout), _text(expired.stderr))
            timed_out = True
        peak = int((group / ("memory.max_usage_in_bytes" if v1 else "memory.peak")).read_text())
        events = (group / ("memory.oom_control" if v1 else "memory.events")).read_text()
        oom = any(line.split()[0] == "oom_kill" and int(line.split()[1]) > 0 for line in events.splitlines())
        return Limited(done.returncode, done.stdout, done.stderr, peak, oom, timed_out)
    finally:
        if v1:
            (group / "memory.force_empty").write_text("0")  # uncharge the page cache it still holds
        group.rmdir()


def spawn_measured(cmd: list[str], limit_bytes: int, timeout: float | None = None) -> dict:
    """A benchmark's child run from a cold page cache under `run_limited`: the JSON object of its
    last line of output, or {"failed": why} (and "timed_out": the timeout, when that was why);
    either way with "peak_cgroup", the cgroup's peak in bytes."""
    drop_page_cache()
    done = run_limited(cmd, limit_bytes, timeout=timeout)
    if done.timed_out:
        return {"failed": f"did not finish in {timeout:g} s", "timed_out": timeout, "peak_cgroup": done.peak_bytes}
    if done.returncode != 0:
        why = "killed at the memory limit" if done.oom_killed else "; ".join(done.stderr.strip().splitlines()[-3:])
        return {"failed": why, "peak_cgroup": done.peak_bytes}
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"peak_cgroup": done.peak_bytes}


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only), so that a run reads its files from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        return False
    return True
