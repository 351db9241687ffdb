"""Who owns a scratch directory, so that what a killed process left behind is reclaimed by the next
process that works beside it, and nothing that a live process still uses.

An engine's offload folder (`flexeval-*`) and a write in progress (`.tmp-*`, see `flexeval.atomic`)
are directories holding an owner record: the process id, the process's start time (so that a
recycled pid is not taken for the owner) and the machine. A process that ends normally deletes
its own directories; one that is killed (kill -9, the OOM killer, `timeout`) cannot, and `reclaim`
deletes them once their owner is gone for certain: the record was written on this machine, and
no process with that pid and start time is running (a zombie, killed but not yet reaped, counts as
gone: it holds no files).

Left alone, because nothing here can tell whether their owner still runs:
- directories recorded on another machine, which here means another host name, boot
  (`/proc/sys/kernel/random/boot_id`) or pid namespace: its pids say nothing about this one's (a
  shared file system, another container, a reboot since);
- directories without a readable record: written by a flexeval older than this module, or created
  a moment ago by a process still writing its record.
`leftovers` counts them, so that an error about disk space can point at them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_FILE = ".flexeval-owner.json"


@dataclass(frozen=True)
class Owner:
    """A process, named so that it is recognised on its own machine and nowhere else."""

    pid: int
    start: int | None  # clock ticks after boot (/proc/<pid>/stat field 22); None without /proc
    host: str
    boot: str  # empty without /proc
    pid_namespace: str  # empty without /proc

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(pid, _start_time(pid), socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), _pid_ns())

    def same_machine(self, other: Owner) -> bool:
        """Whether `other`'s pid names a process of this machine, boot and pid namespace."""
        return (self.host, self.boot, self.pid_namespace) == (other.host, other.boot, other.pid_namespace)

    def running(self) -> bool:
        """Whether this process still runs (asked on its own machine: see `same_machine`)."""
        if self.start is None:  # no /proc: a recycled pid passes for the owner, which errs on the safe side
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # someone else's process
                pass
            return True
        return _start_time(self.pid) == self.start


@dataclass(frozen=True)
class Reclaimed:
    """What `reclaim` deleted, or what `leftovers` found."""

    directories: int = 0
    bytes: int = 0


def owned_directory(parent: Path, prefix: str) -> Path:
    """A new directory in `parent`, named `prefix` plus a random suffix, that records this process as its owner."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    claim(directory, Owner.current())
    return directory


def claim(directory: Path, owner: Owner) -> None:
    """Record `owner` in `directory`, atomically: a reader sees the whole record or none."""
    scratch = directory / f"{OWNER_FILE}.{owner.pid}.tmp"
    scratch.write_text(json.dumps(asdict(owner)), encoding="utf-8")
    os.replace(scratch, directory / OWNER_FILE)


def owner_of(directory: Path) -> Owner | None:
    """The owner recorded in `directory`; None when there is no readable record."""
    try:
        return Owner(**json.loads((directory / OWNER_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def remove(directory: Path) -> None:
    """Delete an owned directory, its owner record last: a deletion interrupted by a kill leaves a
    directory that the next `reclaim` still recognises."""
    try:
        children = list(directory.iterdir())
    except FileNotFoundError:
        return
    except OSError:
        children = []
    for child in children:
        if child.name == OWNER_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    (directory / OWNER_FILE).unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def reclaim(parent: Path, pattern: str, what: str) -> Reclaimed:
    """Delete the directories in `parent` matching `pattern` whose owner is gone (see the module
    docstring for which are left alone) and log what that freed; `what` names one of them."""
    me, count, freed = Owner.current(), 0, 0
    for directory in _matching(parent, pattern):
        owner = owner_of(directory)
        if owner is None or not me.same_machine(owner) or owner.running():
            continue
        size = disk_bytes(directory)
        remove(directory)
        if not directory.exists():
            count, freed = count + 1, freed + size
    if count:
        plural = what if count == 1 else f"{what}s"
        log.warning("reclaimed %s from %d %s left by killed runs in %s", mebibytes(freed), count, plural, parent)
    return Reclaimed(count, freed)


def leftovers(parent: Path, pattern: str, besides: Path) -> Reclaimed:
    """The directories in `parent` matching `pattern` other than `besides`, and their bytes: those
    of live processes and those `reclaim` leaves alone."""
    found = [d for d in _matching(parent, pattern) if d != besides]
    return Reclaimed(len(found), sum(disk_bytes(d) for d in found))


def disk_bytes(directory: Path) -> int:
    """The disk space a directory tree takes: allocated blocks, what deleting it frees."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in (root, *(os.path.join(root, f) for f in files)):
            try:
                total += os.lstat(name).st_blocks * 512
            except OSError:
                pass
    return total


def mebibytes(n: int) -> str:
    """Bytes as messages about disk space state them (binary units, as `df -h` and `du -h` do)."""
    return f"{n / 2**20:,.1f} MiB"


def _matching(parent: Path, pattern: str) -> list[Path]:
    try:
        return [p for p in parent.glob(pattern) if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def _start_time(pid: int) -> int | None:
    """A process's start time, in clock ticks after boot; None when it is not running (a zombie is
    not) or there is no /proc."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
    state, start = fields[0], fields[19]  # fields 3 and 22 of proc(5)
    return None if state in ("Z", "X") else int(start)


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""
