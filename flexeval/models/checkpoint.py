"""Reading a checkpoint's tensors into a model's layers: a name table plus one loop.

safetensors files are memory-mapped, so a tensor costs memory only once it is copied out;
`.bin` files are read with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import json
import math
import pickle
import weakref
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from flexeval.errors import FlexevalError, first_line
from flexeval.models import dummy, gguf
from flexeval.models.common import Model, Param

# Buffers some checkpoints carry that are recomputed from the config, never loaded.
RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)
# Bigger safetensors tensors are copied out a slice of rows at a time, each through its own
# mapping of the file: mapped pages count as this process's memory until they are unmapped.
READ_SLICE_BYTES = 4 * 2**20
# Weights bigger than this are handed to the tiers as `Lazy` (unless something must see them whole).
SLICE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Lazy:
    """A weight not read yet: its shape and dtype, and a reader of row ranges. A tier that writes
    weights out (disk) reads it a slice of rows at a time, so that loading a model onto disk
    holds one slice of a tensor, not the tensor (a 151,936-row head: 0.9 GB in fp32); the
    others take it whole."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[int, int], Tensor]  # rows [start, stop)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def materialize(self) -> Tensor:
        return self.read(0, self.shape[0])

    def slices(self) -> Iterator[Tensor]:
        rows = max(1, SLICE_BYTES * self.shape[0] // max(self.nbytes, 1))
        for start in range(0, self.shape[0], rows):
            yield self.read(start, min(start + rows, self.shape[0]))


class Checkpoint:
    """The tensors of a checkpoint directory, by name, read lazily from their files.

    A safetensors file is opened (memory-mapped) only for the one read and closed right after,
    so the pages of tensors already handed over stop counting against this process's memory; a
    big tensor is read a slice at a time, so that its copy and its mapped pages never both
    exist in full.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = self.source = directory
        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._bins: dict[Path, dict[str, Tensor]] = {}
        for path in self._weight_files():
            with self._open(path) as handle:
                for name in handle.keys():
                    self._files[name] = path
                    self._shapes[name] = handle.shape(name)

    def _weight_files(self) -> list[Path]:
        for index_name, pattern in (
            ("model.safetensors.index.json", "*.safetensors"),
            ("pytorch_model.bin.index.json", "*.bin"),
        ):
            index = self.directory / index_name
            if index.exists():
                shards = sorted({self._shard(index, f) for f in json.loads(index.read_text())["weight_map"].values()})
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

    def _shard(self, index: Path, name: object) -> Path:
        """A shard named by the index: a path inside the checkpoint directory, or a FlexevalError.
        Judged by its name, not where it resolves to: the hub's cache links every file of a
        snapshot to a blob outside it, while a name with `..` or an absolute one could make a
        checkpoint read any file."""
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise FlexevalError(
                f"{index} names weight file {name} outside {self.directory}: refused; use a checkpoint whose "
                "index names its own files"
            )
        return self.directory / name

    @contextmanager
    def _open(self, path: Path) -> Iterator[_Reader]:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    yield _SafetensorsReader(handle)
            else:
                if path not in self._bins:
                    self._bins[path] = _load_bin(path)
                yield _BinReader(self._bins[path])
        except pickle.UnpicklingError as err:
            raise FlexevalError(
                f"refused weight file {path}: it pickles objects other than tensors, which could run code; "
                "use a safetensors copy from a trusted source"
            ) from err
        except (SafetensorError, OSError, RuntimeError, zipfile.BadZipFile) as err:
            raise _corrupt(path, err) from err

    def names(self) -> set[str]:
        return set(self._files)

    def resolve(self, name: str) -> str | None:
        """The stored name for `name`; some checkpoints (original OPT) omit the `model.` prefix."""
        for candidate in (name, name.removeprefix("model.")):
            if candidate in self._files:
                return candidate
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str, dtype: torch.dtype) -> Tensor:
        """The tensor as `dtype` (cast a slice at a time)."""
        path, shape = self._files[name], self._shapes[name]
        with self._open(path) as handle:
            if path.suffix != ".safetensors" or not shape:
                return handle.get(name).to(dtype)
            first = handle.get_rows(name, 0, 1)
            rows = max(1, READ_SLICE_BYTES // max(first.nbytes, 1))
            if rows >= shape[0]:
                return handle.get(name).to(dtype)
        tensor = torch.empty(shape, dtype=dtype)
        for start in range(0, shape[0], rows):
            with self._open(path) as handle:
                tensor[start : start + rows] = handle.get_rows(name, start, start + rows)
        return tensor

    def rows_readable(self, name: str) -> bool:
        return True

    def get_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        path = self._files[name]
        with self._open(path) as handle:
            if path.suffix != ".safetensors":
                return handle.get(name)[start:stop].to(dtype)
            return handle.get_rows(name, start, stop).to(dtype)


class _SafetensorsReader:
    def __init__(self, handle) -> None:
        self.handle = handle

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        return self.handle.get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self.handle.get_slice(name)[start:stop]


class _BinReader:
    def __init__(self, state: dict[str, Tensor]) -> None:
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def get(self, name: str) -> Tensor:
        return self.state[name]


_Reader = _SafetensorsReader | _BinReader


def _corrupt(path: Path, err: BaseException) -> FlexevalError:
    return FlexevalError(f"corrupt weight file {path} ({first_line(err)}): delete it and convert or download it again")


def _load_bin(path: Path) -> dict[str, Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format


Source = Checkpoint | gguf.GGUFCheckpoint | dummy.DummyCheckpoint  # what `iter_weights` reads


def open_checkpoint(directory: Path) -> Source:
    """The tensors of a checkpoint directory, of the GGUF file a prepared directory links to, or
    the generated ones of a dummy directory."""
    if gguf.is_prepared(directory):
        return gguf.open_prepared(directory)
    if dummy.is_dummy(directory):
        return dummy.DummyCheckpoint(directory)
    return Checkpoint(directory)


def iter_weights(
    model: Model,
    checkpoint: Source,
    dtype: torch.dtype,
    as_blocks: Callable[[Param], bool] = lambda param: False,
    lazy: bool = False,
) -> Iterator[dict[str, Tensor | tuple[Tensor, ...] | Lazy]]:
    """Each layer's weights in order, built from the checkpoint by the model's table, on the CPU.

    One layer at a time, so that placing weights on disk never needs the whole model in memory;
    a tensor that several layers share (tied embeddings) is handed to each as the same tensor
    while it is alive (placed in memory), and read again once it is not (written to disk).
    Names and shapes are all checked first: a tensor the model needs but the checkpoint lacks,
    one the checkpoint has that the model would silently ignore, or a shape the config does not
    imply, means a wrong family or variant, and is reported before any work is done. A weight
    that `as_blocks` picks comes as its sources' GGUF blocks (`GGUFCheckpoint.blocks`), undecoded;
    with `lazy`, a big one read from one source comes as a `Lazy`, read when it is stored.
    """
    names = {
        s: _require(checkpoint, model, s) for layer in model.layers for p in layer.params.values() for s in p.sources
    }
    unused = sorted(n for n in checkpoint.names() - set(names.values()) if not _ignorable(n, model))
    if unused:
        raise FlexevalError(
            f"{checkpoint.source} has {len(unused)} tensors the {model.family} family does not use "
            f"(e.g. {unused[:3]}): the config's architecture does not match the weights"
        )
    for layer in model.layers:
        for tensor_name, param in layer.params.items():
            shapes = [checkpoint.shape(names[s]) for s in param.sources]
            stacked = (sum(shape[0] for shape in shapes), *shapes[0][1:]) if shapes[0] else ()
            if any(shape[1:] != shapes[0][1:] for shape in shapes) or stacked != param.shape:
                raise FlexevalError(
                    f"{checkpoint.source}: {layer.name}.{tensor_name} from {list(param.sources)} has shapes "
                    f"{shapes}, the config implies {param.shape}: config and weights disagree"
                )

    shared: weakref.WeakValueDictionary[tuple[str, ...], Tensor] = weakref.WeakValueDictionary()

    def build(param: Param) -> Tensor | tuple[Tensor, ...] | Lazy:
        if as_blocks(param):
            return tuple(checkpoint.blocks(names[source]) for source in param.sources)
        (source, *others) = [names[s] for s in param.sources]
        if lazy and not others and param.nbytes(dtype) > SLICE_BYTES and checkpoint.rows_readable(source):
            return Lazy(param.shape, dtype, partial(checkpoint.get_rows, source, dtype=dtype))
        tensor = shared.get(param.sources)
        if tensor is None:
            parts = [checkpoint.get(names[source], dtype) for source in param.sources]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            shared[param.sources] = tensor
        return tensor

    for layer in model.layers:
        yield {name: build(p) for name, p in layer.params.items()}


def _require(checkpoint: Source, model: Model, source: str) -> str:
    name = checkpoint.resolve(source)
    if name is None:
        raise FlexevalError(
            f"{checkpoint.source} lacks tensor {source!r} that the {model.family} config requires: "
            "incomplete or mismatched checkpoint"
        )
    return name


def _ignorable(name: str, model: Model) -> bool:
    return (
        name.endswith(RECOMPUTED_SUFFIXES) or name in model.ignored_sources or f"model.{name}" in model.ignored_sources
    )
