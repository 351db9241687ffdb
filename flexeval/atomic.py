"""Writing directories so that a reader never sees a half-written one.

Everything is written under a temporary name in the destination's own parent (same file
system) and renamed into place only when complete; an interrupted write leaves at most a
`.tmp-*` entry that no reader trusts and that the next writer ignores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
