"""Helpers shared by the benchmark scripts: where the shared data is, real text to feed, memory."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from flexeval.data import data_dir

__all__ = [
    "data_dir",
    "dense_checkpoint",
    "evaluate_task",
    "generate_from_disk",
    "prompt_windows",
    "rss_bytes",
    "wikitext_pages",
    "wikitext_tokens",
]

WIKITEXT = "wikitext2/wikitext_document_level-2-raw-v1_test.jsonl"


def dense_checkpoint(spec: str) -> Path:
    """A safetensors checkpoint directory of a model, for peers that only read those (Accelerate's
    disk offload memory-maps one): a GGUF model's weights dequantized to fp32, written once into
    the flexeval cache."""
    from safetensors.torch import save_file

    from flexeval.atomic import atomic_directory
    from flexeval.models import registry

    source = registry.resolve(spec)
    if not registry.hf_kwargs(source):
        return source
    target = registry.cache_root() / "dense" / source.name
    if not target.is_dir():
        with atomic_directory(target) as scratch:
            model = registry.hf_model(source)
            state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
            if model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)  # the embedding's storage; safetensors stores it once
            save_file(state, str(scratch / "model.safetensors"), metadata={"format": "pt"})
            model.config.quantization_config = None  # dense now: loaders must not treat it as GGUF
            model.config.save_pretrained(scratch)
            registry.load_tokenizer(source).save_pretrained(scratch)
    return target


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
