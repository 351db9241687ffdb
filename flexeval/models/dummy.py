"""Dummy weights at a real model's shape (FlexGen's `_DUMMY_`): throughput and memory without a checkpoint.

A spec `dummy:<shape>` names a config in `conf/shapes/` (Llama-2-7B, Llama-3.1-8B, Qwen2.5-7B,
OPT-1.3B, OPT-30B) or a `config.json` path. Its prepared directory holds the config, the default
model's tokenizer (nothing here ships the real ones) and `dummy.json`; the weights are never
stored: each tensor is generated when the engine reads it, from a generator seeded by the
tensor's name, so a load is deterministic whatever order it reads in, and costs no more memory
than one tensor. The engine writes them to their tiers like any checkpoint's. Accuracy is
meaningless, and every result says so.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flexeval.data import CONF_DIR
from flexeval.errors import FlexevalError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

PREFIX = "dummy:"
MARKER = "dummy.json"  # in a prepared directory: the seed and the shape's name
SHAPES_DIR = CONF_DIR / "shapes"
INIT_STD = 0.02  # transformers' initializer_range
CHUNK_ROWS = 1024  # rows generated from one seed
NOTE = "dummy weights (random, seeded): accuracy is meaningless; throughput and memory are real"


def shapes() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def config_path(spec: str) -> Path:
    """The config.json a `dummy:<shape>` spec names, or a FlexevalError listing the shapes."""
    shape = spec.removeprefix(PREFIX)
    path = SHAPES_DIR / f"{shape}.json" if shape in shapes() else Path(shape).expanduser()
    if not path.is_file():
        raise FlexevalError(
            f"unknown dummy shape {shape!r}: use dummy:<shape> with one of {', '.join(shapes())}, "
            "or dummy:/path/to/config.json"
        )
    return path


def prepare(spec: str, tokenizer: PreTrainedTokenizerBase, directory: Path, seed: int = 0) -> None:
    """Write the config (its vocabulary widened to the tokenizer's if smaller, so that every token
    id is a row), the tokenizer and the marker into `directory`."""
    config = json.loads(config_path(spec).read_text())
    widened = max(config["vocab_size"], len(tokenizer))
    config |= {"vocab_size": widened, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config.pop("pad_token_id", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(directory)
    (directory / MARKER).write_text(json.dumps({"shape": spec.removeprefix(PREFIX), "seed": seed, "note": NOTE}))


def is_dummy(directory: Path) -> bool:
    return (directory / MARKER).is_file()


class DummyCheckpoint:
    """A checkpoint whose tensors are generated on reading (the interface of `checkpoint.Checkpoint`).

    Names and shapes are transformers' own for the config (its model built on the meta device,
    which allocates nothing); values are uniform with the standard deviation of transformers'
    initialisation, norms' weights one and biases zero, as a freshly initialised model's.
    """

    def __init__(self, directory: Path) -> None:
        self.source = directory
        self.seed = json.loads((directory / MARKER).read_text())["seed"]
        from transformers import AutoConfig, AutoModelForCausalLM

        config: PretrainedConfig = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        state = model.state_dict()
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        self._shapes = {name: tuple(t.shape) for name, t in state.items()}

    def names(self) -> set[str]:
        return set(self._shapes)

    def resolve(self, name: str) -> str | None:
        return name if name in self._shapes else None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str, dtype: torch.dtype) -> Tensor:
        shape = self._shapes[name]
        if len(shape) == 1:
            return (torch.zeros if name.endswith("bias") else torch.ones)(shape, dtype=dtype)
        return self.get_rows(name, 0, shape[0], dtype)

    def rows_readable(self, name: str) -> bool:
        return True

    def get_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Rows [start, stop): generated in runs of CHUNK_ROWS rows, each from its own seed, so
        that any slice of a tensor is the same whichever way the tensor is read."""
        shape = self._shapes[name]
        bound = INIT_STD * 3**0.5  # uniform on [-b, b] has standard deviation b / sqrt(3)
        out = torch.empty(stop - start, *shape[1:], dtype=dtype)
        for chunk in range(start // CHUNK_ROWS, -(-stop // CHUNK_ROWS)):
            first, last = chunk * CHUNK_ROWS, min((chunk + 1) * CHUNK_ROWS, shape[0])
            seed = (self.seed << 48) | (zlib.crc32(name.encode()) << 16) | chunk
            rows = torch.empty(last - first, *shape[1:], dtype=dtype)
            rows.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
            lo, hi = max(first, start), min(last, stop)
            out[lo - start : hi - start] = rows[lo - first : hi - first]
        return out
