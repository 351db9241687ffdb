"""The three places a tensor can live — the compute device, CPU RAM, disk — behind one interface.

Every tier stores *bundles* (a dict of named tensors: one layer's weights, one micro-batch's KV
cache or hidden state) under a key, with the same `put` / `get` / `release` / `evict`; `get`
always answers with tensors on the compute device, so the schedule asks for "layer j's weights"
and never branches on where they are. All movement goes through `to_device`.

On a machine without CUDA the compute device *is* CPU RAM: the compute and CPU tiers then hold
tensors in place and `get` costs nothing; only the disk tier moves bytes.
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from flexeval.errors import FlexevalError

Bundle = dict[str, Tensor]
ALIGN = 4096  # O_DIRECT needs offsets, sizes and buffer addresses aligned to the logical block size
POOL_GRANULE = 2 * 2**20


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
    """The one copy function: a bundle's tensors on `device` (pinned when staging in CPU RAM for CUDA)."""
    if pin:
        return {k: t.to("cpu").pin_memory() for k, t in bundle.items()}
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
    """A bundle on the compute device; `buffer` is the staging memory to hand back after use."""

    bundle: Bundle
    buffer: Tensor | None = None
    copied: bool = True  # False when the tier handed out its own tensors


class Tier(ABC):
    name: str

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats = TierStats()
        self._sizes: dict[str, int] = {}

    def put(self, key: str, bundle: Bundle) -> None:
        size = nbytes(bundle)
        start = time.perf_counter()
        copied = self._put(key, bundle)
        held = size - self._sizes.get(key, 0)
        self.stats.count(written=size if copied else 0, held=held, seconds=time.perf_counter() - start)
        self._sizes[key] = size

    def get(self, key: str) -> Fetched:
        start = time.perf_counter()
        fetched = self._get(key)
        self.stats.count(read=self._sizes[key] if fetched.copied else 0, seconds=time.perf_counter() - start)
        return fetched

    def release(self, fetched: Fetched) -> None:  # noqa: B027 - only tiers that stage through buffers override it
        """Hand back the staging memory of a `get` once its tensors are no longer used."""

    def evict(self, key: str) -> None:
        self._evict(key)
        self.stats.count(held=-self._sizes.pop(key, 0))

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    @abstractmethod
    def _put(self, key: str, bundle: Bundle) -> bool:
        """Store the bundle; True if its bytes were copied (False: kept the caller's tensors)."""

    @abstractmethod
    def _get(self, key: str) -> Fetched: ...

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

    def _put(self, key: str, bundle: Bundle) -> bool:
        on_home = all(t.device == self.home for t in bundle.values()) and not self.pin
        self._data[key] = bundle if on_home else to_device(bundle, self.home, pin=self.pin)
        return not on_home

    def _get(self, key: str) -> Fetched:
        bundle = self._data[key]
        if self.home == self.device:
            return Fetched(bundle, copied=False)
        return Fetched(to_device(bundle, self.device))

    def _evict(self, key: str) -> None:
        del self._data[key]


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
        capacity = -(-size // POOL_GRANULE) * POOL_GRANULE  # near-equal sizes (embedding, head) share buffers
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if capacity <= b.numel() <= 2 * capacity]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
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
    aligned buffer when the file system allows it (else plain `pread`), and drop the file's pages
    from the page cache afterwards, so a later read is never served from memory. Durable bundles
    (weights) are synced and renamed into place; transient ones (KV cache, activations) are
    rewritten in place, as they change every step and die with the run.
    """

    name = "disk"

    def __init__(self, directory: Path, device: torch.device, pin: bool = False, durable: bool = False) -> None:
        super().__init__(device)
        self.directory = directory
        self.durable = durable
        self.pool = BufferPool(pin=pin and device.type == "cuda")
        self._layout: dict[str, tuple[list[_Entry], int]] = {}

    def _path(self, key: str) -> Path:
        return self.directory / (key.replace("/", "__") + ".bin")

    def _put(self, key: str, bundle: Bundle) -> bool:
        entries, offset = [], 0
        for name, tensor in bundle.items():
            entries.append(_Entry(name, tensor.dtype, tuple(tensor.shape), offset))
            offset += -(-tensor.nbytes // ALIGN) * ALIGN
        path = self._path(key)
        target = path.with_name(path.name + ".tmp") if self.durable else path
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if self.durable else 0), 0o600)
        try:
            for entry, tensor in zip(entries, bundle.values()):
                data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
                if os.pwrite(fd, data, entry.offset) != data.nbytes:
                    raise OSError(f"short write to {target}")
            os.ftruncate(fd, offset)
            if self.durable:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as err:
            if self.durable:
                target.unlink(missing_ok=True)
            raise FlexevalError(f"cannot write {path} in the offload directory: {err.strerror or err}") from err
        finally:
            os.close(fd)
        if self.durable:
            os.replace(target, path)
        self._layout[key] = (entries, offset)
        return True

    def _get(self, key: str) -> Fetched:
        entries, size = self._layout[key]
        buffer = self.pool.acquire(size)
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # file systems without direct I/O (tmpfs): plain reads, pages dropped below
            fd = os.open(path, os.O_RDONLY)
        try:
            view = memoryview(buffer.numpy())
            done = 0
            while done < size:
                n = os.preadv(fd, [view[done:]], done)
                if n <= 0:
                    raise OSError(f"unexpected end of {path}")
                done += n
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        bundle = {
            e.name: buffer[e.offset : e.offset + _numel(e) * e.dtype.itemsize].view(e.dtype).view(e.shape)
            for e in entries
        }
        if self.device.type == "cpu":
            return Fetched(bundle, buffer)
        uploaded = to_device(bundle, self.device)
        torch.cuda.current_stream(self.device).synchronize()
        self.pool.release(buffer)
        return Fetched(uploaded)

    def release(self, fetched: Fetched) -> None:
        if fetched.buffer is not None:
            self.pool.release(fetched.buffer)

    def _evict(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._layout.pop(key, None)


def _numel(entry: _Entry) -> int:
    return torch.Size(entry.shape).numel()
