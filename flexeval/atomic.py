"""Writing files and directories so that a reader never sees a half-written one.

Everything is written into a scratch directory `.tmp-<name>-*` in the destination's own parent
(same file system) and renamed into place only when complete. The scratch directory records its
owner (`flexeval.ownership`), so that what a killed writer left (a conversion's gigabytes) is
deleted by the next writer into the same parent; no reader trusts a `.tmp-*` entry.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flexeval import ownership

SCRATCH = ".tmp-*"


@contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """Yield an empty scratch directory that becomes `destination` if the block succeeds.

    If another process completed the same destination meanwhile, its copy is kept.
    """
    with _scratch(destination) as scratch:
        scratch.mkdir()
        yield scratch
        try:
            os.replace(scratch, destination)
        except OSError:
            if not destination.is_dir():
                raise


@contextmanager
def atomic_file(destination: Path) -> Iterator[Path]:
    """Yield a scratch path to write; it replaces `destination` only if the block succeeds, so a
    reader (or a rerun after a crash) sees the old file or the new one, never a torn one."""
    with _scratch(destination) as scratch:
        yield scratch
        os.replace(scratch, destination)


def write_text(destination: Path, text: str) -> None:
    with atomic_file(destination) as scratch:
        scratch.write_text(text, encoding="utf-8")


@contextmanager
def _scratch(destination: Path) -> Iterator[Path]:
    """A path named like `destination`, inside an owned `.tmp-*` directory beside it that is
    deleted afterwards; first, the scratch directories of killed writers there are reclaimed."""
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    ownership.reclaim(parent, SCRATCH, "unfinished write")
    holder = ownership.owned_directory(parent, f".tmp-{destination.name}-")
    try:
        yield holder / destination.name
    finally:
        ownership.remove(holder)
