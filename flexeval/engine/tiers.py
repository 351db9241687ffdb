"""The three places a tensor can live — the compute device, CPU RAM, disk — behind one interface.

Every tier stores *bundles* (a dict of named tensors: one layer's weights, one micro-batch's KV
cache or hidden state) under a key, with the same `put` / `get` / `write_rows` / `release` /
`evict`; `get` always answers with tensors on the compute device, so the schedule asks for
"layer j's weights" and never branches on where they are. `get` can also fetch only some rows of
a tensor (the embedding rows of the tokens at hand, a slice of the vocabulary, the cache values
sparse attention chose), and `write_rows` overwrites some (a decoding step's cache column). All
movement goes through `to_device`.

On a machine without CUDA the compute device *is* CPU RAM: the compute and CPU tiers then hold
tensors in place and `get` costs nothing; only the disk tier moves bytes. On CUDA each tier copies
on its own stream, so that uploads and downloads run beside the compute stream's kernels.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flexeval.errors import FlexevalError
from flexeval.models.checkpoint import Lazy
from flexeval.ownership import mebibytes

Bundle = dict[str, Tensor]
Rows = Mapping[str, Tensor]  # tensor name -> sorted, distinct indices of the rows to fetch
RowWrites = Mapping[str, tuple[Tensor, Tensor]]  # tensor name -> (sorted, distinct row indices, their new rows)
ALIGN = 4096  # O_DIRECT needs offsets, sizes and buffer addresses aligned to the logical block size
# Tensors sit this close in a layer's file (any dtype's alignment, a cache line); a read of one
# of them covers the aligned blocks around it. Small tensors (quantization scales) waste no blocks.
PACK = 64
POOL_GRANULE = 2 * 2**20
# Row reads: ranges closer than ROW_GAP_BYTES are read as one, and no single read exceeds
# ROW_READ_BYTES, which bounds the staging memory. On this project's reference SSD a direct read
# call costs about as much as 64 KiB of transfer; 16 KiB keeps most of that saving while the
# bytes read stay close to the rows asked for (2,123 embedding rows: 17 MB in 86 ms, where
# reading every page singly takes 156 ms and merging 256 KiB gaps reads 73 MB).
ROW_GAP_BYTES = 16 * 2**10
ROW_READ_BYTES = 4 * 2**20


def distribute(sizes: Sequence[int], shares: Sequence[float]) -> list[int]:
    """Assign items (in order) to tiers so that each tier's bytes track its share.

    Each item goes to the tier furthest below its target for the bytes seen so far, so every
    prefix of the sequence — and so the whole — is split within one item's bytes of the shares,
    and the tiers interleave evenly instead of taking contiguous runs.
    """
    assigned = [0] * len(shares)
    seen = 0
    out = []
    for size in sizes:
        seen += size
        tier = max((t for t, share in enumerate(shares) if share > 0), key=lambda t: shares[t] * seen - assigned[t])
        assigned[tier] += size
        out.append(tier)
    return out


def to_device(bundle: Bundle, device: torch.device, pin: bool = False) -> Bundle:
    """The one copy function: a bundle's tensors on `device` (pinned when staging in CPU RAM for CUDA).

    Copies are asynchronous on CUDA: the tier that asked synchronises its stream before handing
    the tensors on.
    """
    if pin:
        return {
            k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for k, t in bundle.items()
        }
    return {k: t.to(device, non_blocking=True) for k, t in bundle.items()}


def nbytes(bundle: Bundle) -> int:
    return sum(t.nbytes for t in bundle.values())


@dataclass
class TierStats:
    bytes_read: int = 0  # copied out of this tier by `get` (handing out tensors in place copies nothing)
    bytes_written: int = 0  # copied into this tier by `put`
    held: int = 0  # bytes stored now
    peak: int = 0  # most bytes stored at once
    io_seconds: float = 0.0  # time spent in this tier's reads and writes
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, read: int = 0, written: int = 0, held: int = 0, seconds: float = 0.0) -> None:
        with self.lock:
            self.bytes_read += read
            self.bytes_written += written
            self.held += held
            self.peak = max(self.peak, self.held)
            self.io_seconds += seconds

    def reset(self) -> None:
        """Start counting anew (what is held stays held)."""
        with self.lock:
            self.bytes_read = self.bytes_written = 0
            self.io_seconds = 0.0
            self.peak = self.held

    def as_dict(self) -> dict[str, float]:
        return {
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "peak_bytes": self.peak,
            "io_seconds": self.io_seconds,
        }


@dataclass
class Fetched:
    """A bundle on the compute device; `buffers` is the staging memory to hand back after use."""

    bundle: Bundle
    read: int  # bytes copied out of the tier (0 when it handed out its own tensors)
    buffers: list[Tensor] = field(default_factory=list)


def select_rows(tensor: Tensor, rows: Tensor) -> Tensor:
    """The given rows of a tensor: a view when they are contiguous, else a copy."""
    first, count = int(rows[0]), len(rows)
    if int(rows[-1]) - first + 1 == count:
        return tensor.narrow(0, first, count)
    return tensor.index_select(0, rows.to(tensor.device))


class Tier(ABC):
    name: str

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats = TierStats()
        self._sizes: dict[str, int] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    @abstractmethod
    def in_place(self) -> bool:
        """True when `get` hands out the stored tensors themselves: nothing to move, nothing to overlap."""

    def put(self, key: str, bundle: Bundle) -> None:
        size = nbytes(bundle)
        start = time.perf_counter()
        with self._copying(after_compute=True):
            copied = self._put(key, bundle)
        held = size - self._sizes.get(key, 0)
        self.stats.count(written=size if copied else 0, held=held, seconds=time.perf_counter() - start)
        self._sizes[key] = size

    def write_rows(self, key: str, rows: RowWrites) -> None:
        """Overwrite some rows of a stored bundle's tensors: a decoding step's new KV cache columns,
        without sending back the columns that did not change."""
        start = time.perf_counter()
        with self._copying(after_compute=True):
            self._write_rows(key, rows)
        written = 0 if self.in_place else sum(new.nbytes for _, new in rows.values())
        self.stats.count(written=written, seconds=time.perf_counter() - start)

    def get(self, key: str, rows: Rows | None = None, names: Set[str] | None = None) -> Fetched:
        """The bundle stored under key (only its tensors in `names`, when given), with `rows` only
        those rows of the tensors it names."""
        start = time.perf_counter()
        with self._copying(after_compute=False):
            fetched = self._get(key, rows or {}, names)
        if self._stream is not None and fetched.read:
            compute = torch.cuda.default_stream(self.device)
            for tensor in fetched.bundle.values():  # their memory is not reused until compute is done with it
                if tensor.is_cuda:
                    tensor.record_stream(compute)
        self.stats.count(read=fetched.read, seconds=time.perf_counter() - start)
        return fetched

    @contextmanager
    def _copying(self, after_compute: bool) -> Iterator[None]:
        """Copy on this tier's CUDA stream and wait for the copies; a store first waits for the
        compute stream's queued kernels, which produce what it copies out."""
        if self._stream is None or self.in_place:
            yield
            return
        if after_compute:
            self._stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield
        self._stream.synchronize()

    def release(self, fetched: Fetched) -> None:  # noqa: B027 - only tiers that stage through buffers override it
        """Hand back the staging memory of a `get` once its tensors are no longer used."""

    def ensure_room(self, nbytes: int, what: str) -> None:  # noqa: B027 - only the disk tier can run out
        """Raise a FlexevalError, before anything is written, unless `nbytes` more bytes of `what`
        (the KV cache, activations) fit in this tier."""

    def evict(self, key: str) -> None:
        self._evict(key)
        self.stats.count(held=-self._sizes.pop(key, 0))

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    @abstractmethod
    def _put(self, key: str, bundle: Bundle) -> bool:
        """Store the bundle; True if its bytes were copied (False: kept the caller's tensors)."""

    @abstractmethod
    def _get(self, key: str, rows: Rows, names: Set[str] | None) -> Fetched: ...

    @abstractmethod
    def _write_rows(self, key: str, rows: RowWrites) -> None: ...

    @abstractmethod
    def _evict(self, key: str) -> None: ...


class MemoryTier(Tier):
    """Tensors held in memory: on the compute device ("compute"), or in CPU RAM ("cpu").

    A CPU tier on a CUDA machine keeps pinned copies and uploads them on `get`; anywhere else
    `get` returns the stored tensors themselves, so in-place updates (the KV cache) persist.
    """

    def __init__(self, name: str, device: torch.device, home: torch.device, pin: bool = False) -> None:
        super().__init__(device)
        self.name = name
        self.home = home
        self.pin = pin and home.type == "cpu" and device.type == "cuda"
        self._data: dict[str, Bundle] = {}

    @property
    def in_place(self) -> bool:
        return self.home == self.device

    def _put(self, key: str, bundle: Bundle) -> bool:
        bundle = {n: t.materialize() if isinstance(t, Lazy) else t for n, t in bundle.items()}
        on_home = all(t.device == self.home for t in bundle.values()) and not self.pin
        self._data[key] = bundle if on_home else to_device(bundle, self.home, pin=self.pin)
        return not on_home

    def _get(self, key: str, rows: Rows, names: Set[str] | None) -> Fetched:
        stored = self._data[key].items()
        bundle = {n: select_rows(t, rows[n]) if n in rows else t for n, t in stored if names is None or n in names}
        if self.home == self.device:
            return Fetched(bundle, read=0)
        return Fetched(to_device(bundle, self.device), read=nbytes(bundle))

    def _write_rows(self, key: str, rows: RowWrites) -> None:
        stored = self._data[key]
        for name, (index, new) in rows.items():
            stored[name].index_copy_(0, index.to(self.home), new.to(self.home))

    def _evict(self, key: str) -> None:
        del self._data[key]


def pool_pick(size: int, free: Sequence[int]) -> tuple[int, int | None]:
    """`BufferPool`'s reuse rule, for a request of `size` bytes among free buffers of these
    capacities: (the capacity it needs, the index of the free buffer it takes, None for a new one).
    Capacities are rounded up to POOL_GRANULE, so near-equal sizes (embedding, head) share buffers;
    the smallest free buffer of at least that capacity and at most twice it is taken."""
    capacity = -(-size // POOL_GRANULE) * POOL_GRANULE
    fits = [i for i, held in enumerate(free) if capacity <= held <= 2 * capacity]
    return capacity, min(fits, key=lambda i: free[i]) if fits else None


class BufferPool:
    """Reusable page-aligned staging buffers (pinned on CUDA) for disk reads.

    A request takes a free buffer of at least its size but not more than twice it, so a small
    layer never holds the embedding's big buffer while the embedding needs a new one.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._free: list[Tensor] = []
        self._lock = threading.Lock()

    def acquire(self, size: int) -> Tensor:
        with self._lock:
            capacity, taken = pool_pick(size, [b.numel() for b in self._free])
            if taken is not None:
                return self._free.pop(taken)
        raw = torch.empty(capacity + ALIGN, dtype=torch.uint8, pin_memory=self.pin)
        start = -raw.data_ptr() % ALIGN
        return raw[start : start + capacity]

    def release(self, buffer: Tensor) -> None:
        with self._lock:
            self._free.append(buffer)


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int


class DiskTier(Tier):
    """Bundles as files in an offload directory, read with direct I/O so that disk means disk.

    Each bundle is one file, its tensors at aligned offsets. Reads use O_DIRECT into a reusable
    aligned buffer when the file system allows it (else plain `pread`, after which the file's
    pages are dropped from the page cache), so a read is never served from memory. Durable
    bundles (weights) are synced, renamed into place and dropped from the page cache too.
    Transient ones (KV cache, activations) are rewritten in place, as they change every step and
    die with the run; their pages stay cached, because a decoding step rewrites a few hundred
    bytes of many pages (`write_rows`), and a page that is not cached must first be read from the
    disk (SmolLM2's cache on disk, 4 windows × 128 steps: row writes 7.6 s, 0.8 s with the pages
    kept). The next direct read writes the dirty pages back first, so every byte still goes
    through the disk.
    """

    name = "disk"

    def __init__(self, directory: Path, device: torch.device, pin: bool = False, durable: bool = False) -> None:
        super().__init__(device)
        self.directory = directory
        self.durable = durable
        self.pool = BufferPool(pin=pin and device.type == "cuda")
        self._layout: dict[str, tuple[list[_Entry], int]] = {}

    @property
    def in_place(self) -> bool:
        return False

    def _path(self, key: str) -> Path:
        return self.directory / (key.replace("/", "__") + ".bin")

    def _put(self, key: str, bundle: Bundle) -> bool:
        entries, offset = [], 0
        for name, tensor in bundle.items():
            entries.append(_Entry(name, tensor.dtype, tuple(tensor.shape), offset))
            offset += _aligned(tensor.nbytes, PACK)
        offset = _aligned(offset)  # whole-file reads are whole blocks
        path = self._path(key)
        target = path.with_name(path.name + ".tmp") if self.durable else path
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if self.durable else 0), 0o600)
        except OSError as err:
            raise _write_failed(path, err) from err
        try:
            for entry, tensor in zip(entries, bundle.values()):
                at = entry.offset
                for part in tensor.slices() if isinstance(tensor, Lazy) else (tensor,):  # a Lazy a slice at a time
                    _pwrite(fd, target, part.detach().to("cpu").contiguous().view(torch.uint8).numpy(), at)
                    at += part.nbytes
            os.ftruncate(fd, offset)
            if self.durable:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as err:
            if self.durable:
                target.unlink(missing_ok=True)
            raise _write_failed(path, err) from err
        finally:
            os.close(fd)
        if self.durable:
            os.replace(target, path)
        self._layout[key] = (entries, offset)
        return True

    def _get(self, key: str, rows: Rows, names: Set[str] | None) -> Fetched:
        entries, size = self._layout[key]
        path = self._path(key)
        direct = True
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # file systems without direct I/O (tmpfs): plain reads, pages dropped below
            fd, direct = os.open(path, os.O_RDONLY), False
        try:
            if rows or names is not None and names != {e.name for e in entries}:
                fetched = self._read_parts(fd, path, [e for e in entries if names is None or e.name in names], rows)
            else:
                buffer = self.pool.acquire(size)
                _pread(fd, path, buffer[:size], 0)
                fetched = Fetched({e.name: _view(buffer, e, e.offset) for e in entries}, size, [buffer])
            if self.durable or not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if self.device.type == "cpu":
            return fetched
        uploaded = to_device(fetched.bundle, self.device)
        torch.cuda.current_stream(self.device).synchronize()
        self.release(fetched)
        return Fetched(uploaded, fetched.read)

    def _read_parts(self, fd: int, path: Path, entries: list[_Entry], rows: Rows) -> Fetched:
        """Whole tensors, and the requested rows of the others, each read with as few calls as sensible."""
        fetched = Fetched({}, 0)
        for e in entries:
            if e.name not in rows:
                start = e.offset // ALIGN * ALIGN
                size = _aligned(e.offset + _numel(e) * e.dtype.itemsize) - start
                buffer = self.pool.acquire(size)
                _pread(fd, path, buffer[:size], start)
                fetched.bundle[e.name], fetched.read = _view(buffer, e, e.offset - start), fetched.read + size
                fetched.buffers.append(buffer)
                continue
            wanted = rows[e.name].tolist()
            ranges = _row_ranges(e, wanted)
            if len(ranges) == 1:  # one contiguous read (a vocabulary slice): hand out a view of it
                start, end, _, _ = ranges[0]
                buffer = self.pool.acquire(end - start)
                _pread(fd, path, buffer[: end - start], start)
                fetched.bundle[e.name], fetched.read = _rows_view(buffer, e, start, wanted), fetched.read + end - start
                fetched.buffers.append(buffer)
                continue
            table = torch.empty((len(wanted), *e.shape[1:]), dtype=e.dtype)
            buffer = self.pool.acquire(ROW_READ_BYTES)
            try:
                for start, end, first, count in ranges:
                    _pread(fd, path, buffer[: end - start], start)
                    table[first : first + count] = _rows_view(buffer, e, start, wanted[first : first + count])
                    fetched.read += end - start
            finally:
                self.pool.release(buffer)
            fetched.bundle[e.name] = table
        return fetched

    def _write_rows(self, key: str, rows: RowWrites) -> None:
        entries = {e.name: e for e in self._layout[key][0]}
        path = self._path(key)
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as err:
            raise _write_failed(path, err) from err
        try:
            for name, (index, new) in rows.items():
                entry, data = entries[name], new.detach().to("cpu").contiguous().view(torch.uint8).numpy()
                index, first = index.tolist(), 0
                for i in range(1, len(index) + 1):  # one write per run of consecutive rows
                    if i == len(index) or index[i] != index[i - 1] + 1:
                        _pwrite(fd, path, data[first:i].reshape(-1), entry.offset + index[first] * _row_bytes(entry))
                        first = i
        except OSError as err:
            raise _write_failed(path, err) from err
        finally:
            os.close(fd)

    def ensure_room(self, nbytes: int, what: str) -> None:
        """Counted in tensor bytes: each file's alignment adds at most a block."""
        free = shutil.disk_usage(self.directory).free
        if free < nbytes:
            raise FlexevalError(
                f"offload directory {self.directory.parent} has {mebibytes(free)} free but this batch's {what} "
                f"would take {mebibytes(nbytes)} more there: free space, lower the policy's disk share of the {what} "
                "or use a smaller batch"
            )

    def release(self, fetched: Fetched) -> None:
        for buffer in fetched.buffers:
            self.pool.release(buffer)
        fetched.buffers.clear()

    def _evict(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._layout.pop(key, None)


def _numel(entry: _Entry) -> int:
    return torch.Size(entry.shape).numel()


def _row_bytes(entry: _Entry) -> int:
    return torch.Size(entry.shape[1:]).numel() * entry.dtype.itemsize


def _aligned(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def _view(buffer: Tensor, entry: _Entry, offset: int) -> Tensor:
    return buffer[offset : offset + _numel(entry) * entry.dtype.itemsize].view(entry.dtype).view(entry.shape)


def _rows_view(buffer: Tensor, entry: _Entry, start: int, rows: list[int]) -> Tensor:
    """Rows `rows` (sorted) of a tensor, from a buffer holding its file from byte `start` on."""
    offset, span = entry.offset + rows[0] * _row_bytes(entry) - start, rows[-1] - rows[0] + 1
    table = buffer[offset : offset + span * _row_bytes(entry)].view(entry.dtype).view(span, *entry.shape[1:])
    if span == len(rows):
        return table
    return table.index_select(0, torch.tensor(rows) - rows[0])


def _row_ranges(entry: _Entry, rows: list[int]) -> list[tuple[int, int, int, int]]:
    """Aligned file ranges covering the rows, merged across small gaps: (start, end, first, count),
    where rows[first : first + count] lie in [start, end)."""
    row_bytes, ranges = _row_bytes(entry), []
    for i, row in enumerate(rows):
        lo = (entry.offset + row * row_bytes) // ALIGN * ALIGN
        hi = _aligned(entry.offset + (row + 1) * row_bytes)
        if ranges and lo - ranges[-1][1] <= ROW_GAP_BYTES and hi - ranges[-1][0] <= ROW_READ_BYTES:
            start, _, first, count = ranges[-1]
            ranges[-1] = (start, max(hi, ranges[-1][1]), first, count + 1)
        else:
            ranges.append((lo, hi, i, 1))
    return ranges


def _pwrite(fd: int, path: Path, data: np.ndarray, offset: int) -> None:
    """Write all of `data` (bytes): a write cut short (the disk filling up) is continued, and the
    next call then says why it cannot go on (ENOSPC)."""
    view, done = memoryview(data.reshape(-1)), 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short write to {path}")
        done += n


def _write_failed(path: Path, err: OSError) -> FlexevalError:
    """A failed write in the offload directory, as one line that keeps its cause and says what to do."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free space in the offload directory or lower the policy's disk share"
    else:
        advice = "check the offload directory or pass another offload_dir"
    return FlexevalError(f"writing {path} failed: {err.strerror or err}: {advice}")


def _pread(fd: int, path: Path, into: Tensor, offset: int) -> None:
    view, done = memoryview(into.numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of {path}")
        done += n
