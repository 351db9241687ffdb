"""Writing files and directories so that a reader never sees a half-written one.

Everything is written under a temporary name in the destination's own parent (same file
system) and renamed into place only when complete; an interrupted write leaves at most a
`.tmp-*` entry that no reader trusts and that the next writer ignores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """Yield an empty scratch directory that becomes `destination` if the block succeeds.

    If another process completed the same destination meanwhile, its copy is kept.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{destination.name}-", dir=destination.parent))
    try:
        yield scratch
        try:
            os.replace(scratch, destination)
        except OSError:
            if not destination.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def atomic_file(destination: Path) -> Iterator[Path]:
    """Yield a scratch path to write; it replaces `destination` only if the block succeeds, so a
    reader (or a rerun after a crash) sees the old file or the new one, never a torn one."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    scratch = destination.parent / f".tmp-{uuid.uuid4().hex[:12]}-{destination.name}"
    try:
        yield scratch
        os.replace(scratch, destination)
    finally:
        scratch.unlink(missing_ok=True)


def write_text(destination: Path, text: str) -> None:
    with atomic_file(destination) as scratch:
        scratch.write_text(text, encoding="utf-8")
