"""What a GPTQ fit calibrates on (`quantization.gptq`): windows of tokens cut from a JSONL file's
documents. Settings and reading only, without torch, so that a configuration naming them is
checked before anything heavy is imported."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from flexeval.errors import FlexevalError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Calibration:
    """The text GPTQ fits the rounding to: `sequences` windows of `length` tokens cut from the
    documents of a JSONL file (its `field`), joined by blank lines. A relative path names a file
    of the benchmark data, which the caller places (`under` its data directory). The default,
    XSum's news articles, shares no text with the documents of the other tasks;
    to evaluate `helm_xsum` itself with fitted weights, calibrate on other text."""

    path: str = "helm_xsum/xsum_test_1000.jsonl"
    field: str = "document"
    sequences: int = 128
    length: int = 256

    def __post_init__(self) -> None:
        for name in ("sequences", "length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FlexevalError(f"calibration: {name} must be a positive integer, got {value!r}")

    @classmethod
    def parse(cls, value: str | Calibration) -> Calibration:
        """From 'path[:field[:sequences[:length]]]' (command lines)."""
        if isinstance(value, Calibration):
            return value
        path, *rest = str(value).split(":")
        if len(rest) > 3 or not all(part.isdigit() for part in rest[1:]):
            raise FlexevalError(f"calibration takes path[:field[:sequences[:length]]], got {value!r}")
        return cls(path, *rest[:1], *(int(part) for part in rest[1:]))

    @property
    def file(self) -> Path:
        return Path(self.path).expanduser()

    def under(self, root: Path) -> Calibration:
        """This calibration with a relative path taken as one under `root`."""
        return self if self.file.is_absolute() else replace(self, path=str(root / self.file))

    def existing_file(self) -> Path:
        if not self.file.is_file():
            raise FlexevalError(f"calibration: {self.file} does not exist: pass another calibration path")
        return self.file

    def tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """`sequences` rows of `length` token ids."""
        needed = self.sequences * self.length
        docs, ids = [], []
        with self.existing_file().open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if self.field not in record:
                    raise FlexevalError(f"calibration: line {number} of {self.file} has no field {self.field!r}")
                docs.append(str(record[self.field]))
                if len(docs) == 64:  # tokenize as we go: stop reading once there is enough
                    ids += tokenizer("\n\n".join(docs) + "\n\n", add_special_tokens=False).input_ids
                    docs.clear()
                    if len(ids) >= needed:
                        break
        if docs:
            ids += tokenizer("\n\n".join(docs), add_special_tokens=False).input_ids
        if len(ids) < needed:
            raise FlexevalError(
                f"calibration: {self.file} holds {len(ids)} tokens, fewer than {self.sequences} x {self.length}: "
                "lower sequences or length, or pass a longer file"
            )
        return [ids[i : i + self.length] for i in range(0, needed, self.length)]
