"""Reading a checkpoint's tensors into a model's layers: a name table plus one loop.

safetensors files are memory-mapped, so a tensor costs memory only once it is copied out;
`.bin` files are read with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from flexeval.errors import FlexevalError, first_line
from flexeval.models.common import Model, Param

# Buffers some checkpoints carry that are recomputed from the config, never loaded.
RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)


class Checkpoint:
    """The tensors of a checkpoint directory, by name, read lazily from their files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        for path in self._weight_files():
            for name in self._handle(path).keys():
                self._files[name] = path

    def _weight_files(self) -> list[Path]:
        for index_name, pattern in (
            ("model.safetensors.index.json", "*.safetensors"),
            ("pytorch_model.bin.index.json", "*.bin"),
        ):
            index = self.directory / index_name
            if index.exists():
                shards = sorted({self.directory / f for f in json.loads(index.read_text())["weight_map"].values()})
                missing = [s.name for s in shards if not s.exists()]
                if missing:
                    raise FlexevalError(f"{index} lists missing weight files {missing}: re-download the checkpoint")
                return shards
            files = sorted(self.directory.glob(pattern))
            if files:
                return files
        raise FlexevalError(
            f"no weight files (*.safetensors or *.bin) in {self.directory}: point at a complete checkpoint directory"
        )

    def _handle(self, path: Path):
        if path not in self._open:
            try:
                if path.suffix == ".safetensors":
                    self._open[path] = safe_open(str(path), framework="pt", device="cpu")
                else:
                    self._open[path] = _load_bin(path)
            except pickle.UnpicklingError as err:
                raise FlexevalError(
                    f"refused weight file {path}: it pickles objects other than tensors, which could run code; "
                    "use a safetensors copy from a trusted source"
                ) from err
            except (SafetensorError, OSError, RuntimeError, zipfile.BadZipFile) as err:
                raise _corrupt(path, err) from err
        return self._open[path]

    def names(self) -> set[str]:
        return set(self._files)

    def resolve(self, name: str) -> str | None:
        """The stored name for `name`; some checkpoints (original OPT) omit the `model.` prefix."""
        for candidate in (name, name.removeprefix("model.")):
            if candidate in self._files:
                return candidate
        return None

    def get(self, name: str) -> Tensor:
        path = self._files[name]
        handle = self._handle(path)
        try:
            return handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]
        except SafetensorError as err:
            raise _corrupt(path, err) from err


def _corrupt(path: Path, err: BaseException) -> FlexevalError:
    return FlexevalError(f"corrupt weight file {path} ({first_line(err)}): delete it and convert or download it again")


def _load_bin(path: Path) -> dict[str, Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format


def load_weights(
    model: Model, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device
) -> list[dict[str, Tensor]]:
    """Every layer's weights, built from the checkpoint by the model's table and shape-checked.

    Tensors that several layers share (tied embeddings) are loaded once and shared. A tensor the
    model needs but the checkpoint lacks, or one the checkpoint has that the model would silently
    ignore, means a wrong family or variant, so both are errors.
    """
    built: dict[tuple[str, ...], Tensor] = {}
    used: set[str] = set()

    def build(layer_name: str, tensor_name: str, param: Param) -> Tensor:
        if param.sources not in built:
            names = [_require(checkpoint, model, source) for source in param.sources]
            used.update(names)
            parts = [checkpoint.get(n) for n in names]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if tuple(tensor.shape) != param.shape:
                raise FlexevalError(
                    f"{checkpoint.directory}: {layer_name}.{tensor_name} from {list(names)} has shape "
                    f"{tuple(tensor.shape)}, the config implies {param.shape}: config and weights disagree"
                )
            built[param.sources] = tensor.to(device=device, dtype=dtype)
        return built[param.sources]

    weights = [{name: build(layer.name, name, p) for name, p in layer.params.items()} for layer in model.layers]
    unused = sorted(n for n in checkpoint.names() - used if not _ignorable(n, model))
    if unused:
        raise FlexevalError(
            f"{checkpoint.directory} has {len(unused)} tensors the {model.family} family does not use "
            f"(e.g. {unused[:3]}): the config's architecture does not match the weights"
        )
    return weights


def _require(checkpoint: Checkpoint, model: Model, source: str) -> str:
    name = checkpoint.resolve(source)
    if name is None:
        raise FlexevalError(
            f"{checkpoint.directory} lacks tensor {source!r} that the {model.family} config requires: "
            "incomplete or mismatched checkpoint"
        )
    return name


def _ignorable(name: str, model: Model) -> bool:
    return (
        name.endswith(RECOMPUTED_SUFFIXES) or name in model.ignored_sources or f"model.{name}" in model.ignored_sources
    )
