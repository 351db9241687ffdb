"""GGUF files (llama.cpp's format) read where they lie, one tensor at a time.

The header is parsed once by the `gguf` package's reader, which maps the file only to read it;
tensors are then read with plain file reads, a slice of rows at a time, dequantized by the same
package (the reference for every block format) straight into a tensor of the dtype asked for,
with llama.cpp's renaming undone and, for the llama architecture, its q/k row interleaving
(convert_hf_to_gguf permutes those rows for its rotary kernel). Memory holds the tensor being
built and one slice of the file, never the file: a mapping would count each page read as this
process's memory until unmapped. transformers turns the header into a config and a tokenizer
once (`prepare`); nothing is dequantized ahead of use.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, get_tensor_name_map
from gguf.quants import dequantize
from torch import Tensor

from flexeval.errors import FlexevalError, first_line

log = logging.getLogger(__name__)
GGUF_NAME = "model.gguf"  # in a prepared directory: a link to the source file
HEADER_NAME = "gguf_header.json"  # beside it: its `Header`
MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "qwen2")  # GGUF architectures whose tensors the llama family reads (mistral is "llama")
PERMUTED = {"llama": (".attn_q.", ".attn_k.")}  # rows convert_hf_to_gguf interleaves, per architecture
TYPES = tuple(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)
READ_SLICE_BYTES = 4 * 2**20  # dequantized bytes per read: the dequantizer's temporaries are a few times this


@dataclass(frozen=True)
class TensorInfo:
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch's order (ggml lists dimensions innermost first)
    offset: int  # of its first byte in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        block, block_bytes = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block * block_bytes


@dataclass(frozen=True)
class Header:
    """What flexeval needs of a GGUF header, checked; saved beside a prepared directory's link,
    because parsing a header (its tokenizer's arrays) takes seconds."""

    architecture: str
    layers: int
    heads: int
    kv_heads: int
    file_size: int
    tensors: dict[str, TensorInfo]

    @classmethod
    def read(cls, path: Path) -> Header:
        """Parse and check a GGUF file's header: every way the file can be wrong short of its
        tensors' bytes is found here, before any heavy work."""
        try:
            reader = GGUFReader(path)
        except Exception as err:  # the reader raises whatever numpy or struct does on bad bytes
            raise FlexevalError(
                f"{path} is truncated or corrupt, not a readable GGUF file ({first_line(err)}): download it again"
            ) from err
        architecture = str(_field(reader, "general.architecture", path))
        if architecture not in ARCHITECTURES:
            raise FlexevalError(
                f"{path}: GGUF architecture {architecture!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
            )
        heads = int(_field(reader, f"{architecture}.attention.head_count", path))
        kv_heads = reader.fields.get(f"{architecture}.attention.head_count_kv")
        header = cls(
            architecture=architecture,
            layers=int(_field(reader, f"{architecture}.block_count", path)),
            heads=heads,
            kv_heads=int(kv_heads.contents()) if kv_heads is not None else heads,
            file_size=path.stat().st_size,
            tensors={
                t.name: TensorInfo(
                    t.tensor_type, tuple(int(d) for d in reversed(t.shape)), int(t.data_offset), int(t.n_bytes)
                )
                for t in reader.tensors
            },
        )
        unsupported = sorted({t.qtype.name for t in header.tensors.values()} - {t.name for t in TYPES})
        if unsupported:
            raise FlexevalError(
                f"{path}: GGUF block formats {unsupported} are not supported "
                f"(supported: {', '.join(t.name for t in TYPES)})"
            )
        end = max((t.offset + t.nbytes for t in header.tensors.values()), default=0)
        if end > header.file_size:
            raise FlexevalError(
                f"{path} is truncated: its tensors need {end:,} bytes, the file has {header.file_size:,}"
            )
        return header

    def to_json(self) -> str:
        tensors = {n: [t.qtype.name, list(t.shape), t.offset, t.nbytes] for n, t in self.tensors.items()}
        return json.dumps({**asdict(self), "tensors": tensors})

    @classmethod
    def from_json(cls, text: str) -> Header:
        fields = json.loads(text)
        tensors = {
            n: TensorInfo(GGMLQuantizationType[q], tuple(shape), offset, nbytes)
            for n, (q, shape, offset, nbytes) in fields.pop("tensors").items()
        }
        return cls(**fields, tensors=tensors)


def looks_like_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


class GGUFCheckpoint:
    """A GGUF file's tensors by name, read lazily (the same interface as `checkpoint.Checkpoint`).

    Names are the file's own (`blk.0.attn_q.weight`); `resolve` maps a Hugging Face name to one.
    """

    def __init__(self, path: Path, header: Header | None = None) -> None:
        self.source = path
        self.header = header or Header.read(path)
        if path.stat().st_size != self.header.file_size:
            raise FlexevalError(f"{path} changed since it was prepared: delete its prepared directory")
        arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == self.header.architecture)
        self._names = get_tensor_name_map(arch, self.header.layers)
        self._tensors = self.header.tensors

    def names(self) -> set[str]:
        return set(self._tensors)

    def resolve(self, name: str) -> str | None:
        """The file's name for a Hugging Face tensor name, if it holds that tensor."""
        base, _, suffix = name.rpartition(".")
        mapped = self._names.get_name(base)
        stored = f"{mapped}.{suffix}" if mapped else None
        return stored if stored in self._tensors else None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def get(self, name: str, dtype: torch.dtype) -> Tensor:
        """The tensor dequantized to `dtype` (as the gguf package computes it, in fp32, then cast)."""
        info = self._tensors[name]
        rows = info.nbytes // info.row_bytes
        order = self._row_order(name, rows)
        if order is None:
            return self.get_rows(name, 0, rows, dtype).reshape(info.shape)
        out = torch.empty(rows, info.shape[-1], dtype=dtype)
        return out.index_copy_(0, order, self._stored_rows(name, 0, rows, dtype)).reshape(info.shape)

    def rows_readable(self, name: str) -> bool:
        """Whether `get_rows` reads this tensor (a permuted one's rows lie scattered in the file)."""
        return not self._permuted(name)

    def get_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Rows [start, stop) of a tensor that `rows_readable`, dequantized to `dtype`."""
        return self._stored_rows(name, start, stop, dtype)

    def _stored_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Stored rows [start, stop), dequantized a slice at a time into one tensor of `dtype`."""
        info = self._tensors[name]
        cols = info.shape[-1]
        out = torch.empty(stop - start, cols, dtype=dtype)
        step = max(1, READ_SLICE_BYTES // (cols * 4))
        with open(self.source, "rb") as f:
            for first in range(start, stop, step):
                count = min(step, stop - first)
                f.seek(info.offset + first * info.row_bytes)
                raw = np.empty((count, info.row_bytes), np.uint8)
                if f.readinto(raw) != raw.nbytes:
                    raise FlexevalError(f"{self.source} is truncated inside tensor {name}: download it again")
                out[first - start : first - start + count] = torch.from_numpy(dequantize(raw, info.qtype))
        return out

    def format(self, name: str) -> str:
        """The GGML type the file stores a tensor in (F32, Q4_K, ...)."""
        return self._tensors[name].qtype.name

    def blocks(self, name: str) -> Tensor:
        """The tensor's bytes as the file holds them, one row of blocks per row (rows in the Hugging
        Face order: a permuted tensor's rows are put back, which keeps every row's blocks whole)."""
        info = self._tensors[name]
        raw = torch.empty(info.nbytes // info.row_bytes, info.row_bytes, dtype=torch.uint8)
        with open(self.source, "rb") as f:
            f.seek(info.offset)
            if f.readinto(raw.numpy()) != info.nbytes:
                raise FlexevalError(f"{self.source} is truncated inside tensor {name}: download it again")
        order = self._row_order(name, raw.shape[0])
        return raw if order is None else torch.empty_like(raw).index_copy_(0, order, raw)

    def _permuted(self, name: str) -> bool:
        return any(part in name for part in PERMUTED.get(self.header.architecture, ()))

    def _row_order(self, name: str, rows: int) -> Tensor | None:
        """Where each stored row of a permuted tensor belongs: llama.cpp stores each head's
        rotary pairs (i, i + d/2) interleaved, as rows 2i and 2i + 1."""
        if not self._permuted(name):
            return None
        heads = self.header.heads if ".attn_q." in name else self.header.kv_heads
        half = rows // heads // 2
        r = torch.arange(rows)
        return (r // (2 * half)) * 2 * half + (r % 2) * half + (r % (2 * half)) // 2


def is_prepared(directory: Path) -> bool:
    """Whether `prepare` wrote this checkpoint directory (its weights are a GGUF file's)."""
    return (directory / GGUF_NAME).is_symlink()


def open_prepared(directory: Path) -> GGUFCheckpoint:
    """The GGUF checkpoint of a directory that `prepare` wrote."""
    path = directory / GGUF_NAME
    if not path.exists():
        raise FlexevalError(f"{path.readlink()}, which {directory} was prepared from, is gone: delete {directory}")
    return GGUFCheckpoint(path, Header.from_json((directory / HEADER_NAME).read_text()))


def _field(reader: GGUFReader, key: str, path: Path) -> str | int:
    field = reader.fields.get(key)
    if field is None:
        raise FlexevalError(f"{path}: the GGUF header lacks {key!r}; the file is incomplete or not a model")
    return field.contents()


def prepare(gguf_file: Path, directory: Path) -> None:
    """Write the config and tokenizer that `gguf_file`'s header implies into `directory`, with a
    link to the file itself, so that the directory reads like any checkpoint directory."""
    header = Header.read(gguf_file)  # refuse a bad file before transformers reads it
    log.warning("reading %s's config and tokenizer (once: cached in %s)", gguf_file.name, directory.parent)
    try:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except (OSError, ValueError, KeyError) as err:
        raise FlexevalError(f"transformers cannot read the header of {gguf_file}: {first_line(err)}") from err
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    os.symlink(gguf_file.resolve(), directory / GGUF_NAME)
    (directory / HEADER_NAME).write_text(header.to_json())
