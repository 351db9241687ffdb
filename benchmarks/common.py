"""Helpers shared by the benchmark scripts: where the shared data is, real text to feed, memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flexeval.data import data_dir

__all__ = ["data_dir", "rss_bytes", "wikitext_pages", "wikitext_tokens"]

WIKITEXT = "wikitext2/wikitext_document_level-2-raw-v1_test.jsonl"


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


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
