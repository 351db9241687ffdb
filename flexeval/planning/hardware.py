"""`HardwareProfile`: what this machine computes and moves per second, measured once and cached.

The cost model (`cost_model`) turns a policy into seconds with these figures, so they are
measured the way the engine works: GEMMs through `F.linear` at the row counts that prefill
(thousands of rows) and decoding (one row per sequence) give, attention through the same SDPA
call, disk reads with direct I/O through `DiskTier` itself, dequantization through
`compression.dequantize`. CPU GEMM speed varies tenfold with the rows (one row streams the
weights from memory; thousands run at the core's peak), hence tables over rows rather than one
FLOP/s figure. Measuring takes about twenty seconds; the result is cached as JSON under the
flexeval cache, keyed by the machine (CPU, core count, threads, torch, GPU, the offload
directory's file system), and `conf/hardware/*.yaml` may override any figure (`profile:`).
Memory available per tier is read afresh each time: it is the one figure that changes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flexeval.atomic import write_text
from flexeval.engine.schedule import Executors
from flexeval.engine.tiers import DiskTier
from flexeval.errors import FlexevalError
from flexeval.models.attention import one_query
from flexeval.quantization.compression import dequantize, quantize
from flexeval.quantization.config import CompressionConfig
from flexeval.reproducible import cpu_model

log = logging.getLogger(__name__)

VERSION = 7  # of the measurement procedure: a new one invalidates cached profiles
GEMM_ROWS = (1, 4, 16, 64, 256, 1024, 4096)
GEMM_WIDTH = 1024  # inner and output size of the profiled GEMMs (weights of 4 MB in fp32)
ATTENTION_LENGTHS = (64, 256, 1024)
DISK_BYTES = 1024 * 2**20
DISK_FILE_BYTES = 16 * 2**20
TRANSFER_BYTES = 64 * 2**20
COLD_BYTES = 256 * 2**20  # cycled weights: 64 MB still ran from this machine's 480 MB cache, 256 MB did not
Table = tuple[tuple[int, float], ...]  # (size, rate) pairs, sizes ascending


@dataclass(frozen=True)
class HardwareProfile:
    """Rates in bytes or FLOP per second, per dtype where the dtype changes them."""

    device: str  # "cpu" or "cuda"
    gemm: Mapping[str, Table]  # dtype -> (rows, FLOP/s) of (rows × 1024) @ (1024 × 1024)
    attention: Mapping[str, Table]  # dtype -> (tokens, FLOP/s) of causal prefill attention (2·h·s²·d)
    decode_attention: Mapping[str, float]  # dtype -> bytes of keys and values a one-query step reads per second
    cpu_decode_attention: Mapping[str, float]  # the same on the CPU (attention delegated to a CPU cache)
    memory_bandwidth: float  # bytes per second of elementwise work on the compute device
    op_seconds: float  # one small op's dispatch: what a layer costs beyond its arithmetic
    dequantize: float  # bytes of dequantized weights produced per second
    h2d: float  # pinned CPU -> GPU copies (0 without CUDA)
    d2h: float
    disk_read: float  # direct I/O, whole files of a layer's size, while compute runs
    disk_write: float  # written, synced
    disk_call_seconds: float  # one small direct read: what a row read costs beyond its bytes
    read_slowdown: float  # compute's time while a worker reads from disk, over its time alone
    memory: Mapping[str, int]  # tier ("compute", "cpu", "disk") -> bytes available now

    def gemm_seconds(self, rows: float, flops: float, dtype: torch.dtype) -> float:
        return flops / interpolate(self.gemm[_name(dtype)], rows)

    def attention_seconds(self, tokens: float, flops: float, dtype: torch.dtype) -> float:
        return flops / interpolate(self.attention[_name(dtype)], tokens)

    def decode_attention_seconds(self, nbytes: float, dtype: torch.dtype, on_cpu: bool = False) -> float:
        rates = self.cpu_decode_attention if on_cpu else self.decode_attention
        return nbytes / rates[_name(dtype)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HardwareProfile:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FlexevalError(f"hardware profile: unknown figures {unknown}; known: {', '.join(sorted(known))}")
        tables = {
            name: {dtype: tuple(tuple(pair) for pair in table) for dtype, table in values[name].items()}
            for name in ("gemm", "attention")
            if name in values
        }
        return cls(**(dict(values) | tables))


def check_overrides(overrides: Mapping[str, Any], where: str = "hardware.profile") -> None:
    """Refuse an override that names no figure or gives one a value the cost model cannot use (a
    rate of 0 divides by zero; a negative or NaN one plans nonsense), naming it as `where`.name."""
    known = {f.name for f in fields(HardwareProfile)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise FlexevalError(f"{where}: unknown figures {unknown}; known: {', '.join(sorted(known))}")
    for name, value in overrides.items():
        usable, what = FIGURES[name]
        if not usable(value):
            raise FlexevalError(f"{where}.{name} must be {what}, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rate(value: Any) -> bool:
    """Rates are divided by: finite and above 0."""
    return _number(value) and value > 0


def _at_least_zero(value: Any) -> bool:
    return _number(value) and value >= 0


def _per_dtype(usable: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, Mapping) and all(usable(v) for v in value.values())


def _table(table: Any) -> bool:
    """(size, rate) pairs, sizes ascending (`interpolate` needs them so), all finite and above 0."""
    if isinstance(table, str) or not isinstance(table, Sequence) or not table:
        return False
    if not all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in table):
        return False
    sizes = [size for size, _ in table]
    return all(a < b for a, b in zip(sizes, sizes[1:])) and all(_rate(x) for pair in table for x in pair)


# Each figure's test, and what it must be, for an override to be usable by the cost model.
FIGURES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "device": (lambda value: value in ("cpu", "cuda"), "cpu or cuda"),
    "gemm": (_per_dtype(_table), "a map of dtypes to [rows, FLOP/s] pairs, rows ascending, all finite and above 0"),
    "attention": (
        _per_dtype(_table),
        "a map of dtypes to [tokens, FLOP/s] pairs, tokens ascending, all finite and above 0",
    ),
    "decode_attention": (_per_dtype(_rate), "a map of dtypes to finite bytes per second above 0"),
    "cpu_decode_attention": (_per_dtype(_rate), "a map of dtypes to finite bytes per second above 0"),
    "memory_bandwidth": (_rate, "finite bytes per second above 0"),
    "op_seconds": (_at_least_zero, "finite seconds, at least 0"),
    "dequantize": (_rate, "finite bytes per second above 0"),
    "h2d": (_rate, "finite bytes per second above 0"),
    "d2h": (_rate, "finite bytes per second above 0"),
    "disk_read": (_rate, "finite bytes per second above 0"),
    "disk_write": (_rate, "finite bytes per second above 0"),
    "disk_call_seconds": (_at_least_zero, "finite seconds, at least 0"),
    "read_slowdown": (
        lambda value: _number(value) and value >= 1,
        "a finite ratio of at least 1 (compute's time while a worker reads, over its time alone)",
    ),
    "memory": (
        lambda value: (
            isinstance(value, Mapping)
            and set(value) <= {"compute", "cpu", "disk"}
            and all(_at_least_zero(v) for v in value.values())
        ),
        "a map of tiers (compute, cpu, disk) to finite bytes, at least 0",
    ),
}


def interpolate(table: Table, size: float) -> float:
    """A rate at `size`, linear in log(size) between measured sizes, flat beyond them."""
    sizes, rates = zip(*table)
    return float(np.interp(np.log(max(size, 1)), np.log(sizes), rates))


def profile(
    device: torch.device,
    offload_dir: Path,
    cache: Path,
    overrides: Mapping[str, Any] | None = None,
    measure: Callable[[torch.device, Path], HardwareProfile] | None = None,
) -> HardwareProfile:
    """This machine's profile: cached under `cache/hardware/`, else measured (and cached), then
    with `overrides` applied and the memory figures read now."""
    check_overrides(overrides or {})
    path = cache / "hardware" / f"{machine_key(device, offload_dir)}.json"
    found = None
    if path.is_file():
        try:
            found = HardwareProfile.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, FlexevalError):
            found = None  # written by another version: measured anew below
    if found is None:
        log.warning("measuring this machine's compute, memory and disk once (about twenty seconds; cached in %s)", path)
        found = (measure or measure_profile)(device, offload_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, found.to_json())
    found = replace(found, memory=available_memory(device, offload_dir))
    if overrides:  # a mapping's entries over the measured ones: gemm.float32 alone leaves bfloat16's
        measured = asdict(found)
        given = {k: dict(measured[k]) | dict(v) if isinstance(v, Mapping) else v for k, v in overrides.items()}
        found = HardwareProfile.from_dict(measured | given)
    return found


def machine_key(device: torch.device, offload_dir: Path) -> str:
    facts = [
        VERSION,
        device.type,
        cpu_model(),
        os.cpu_count(),
        torch.get_num_threads(),
        torch.__version__,
        torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        os.stat(offload_dir).st_dev,
    ]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def available_memory(device: torch.device, offload_dir: Path) -> dict[str, int]:
    ram = _meminfo("MemAvailable")
    compute = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else ram
    return {"compute": int(compute), "cpu": int(ram), "disk": int(shutil.disk_usage(offload_dir).free)}


def measure_profile(device: torch.device, offload_dir: Path) -> HardwareProfile:
    """Measure every figure (about twenty seconds)."""
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    cpu = torch.device("cpu")
    h2d = d2h = 0.0
    if device.type == "cuda":
        h2d, d2h = _transfer(device)
    read, write, call, slowdown = _disk(offload_dir, device)
    return HardwareProfile(
        device=device.type,
        gemm={_name(dt): _gemm_table(device, dt) for dt in dtypes},
        attention={_name(dt): _attention_table(device, dt) for dt in dtypes},
        decode_attention={_name(dt): _decode_attention(device, dt) for dt in dtypes},
        cpu_decode_attention={_name(dt): _decode_attention(cpu, dt) for dt in dtypes if dt != torch.float16},
        memory_bandwidth=_memory_bandwidth(device),
        op_seconds=_op_seconds(device),
        dequantize=_dequantize_rate(device),
        h2d=h2d,
        d2h=d2h,
        disk_read=read,
        disk_write=write,
        disk_call_seconds=call,
        read_slowdown=slowdown,
        memory=available_memory(device, offload_dir),
    )


def timed(fn: Callable[[], Any], device: torch.device, least: float = 0.05) -> float:
    """Seconds per call of fn: the fastest of three rounds of at least `least` seconds each."""
    fn()
    best = float("inf")
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= least:
                break
        best = min(best, elapsed / calls)
    return best


def _gemm_table(device: torch.device, dtype: torch.dtype) -> Table:
    w = torch.randn(GEMM_WIDTH, GEMM_WIDTH, device=device).to(dtype)
    table = []
    for rows in GEMM_ROWS:
        x = torch.randn(rows, GEMM_WIDTH, device=device).to(dtype)
        table.append((rows, 2 * rows * GEMM_WIDTH**2 / timed(lambda x=x: F.linear(x, w), device)))
    return tuple(table)


def _attention_table(device: torch.device, dtype: torch.dtype, heads: int = 8, head_dim: int = 64) -> Table:
    table = []
    for tokens in ATTENTION_LENGTHS:
        q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device).to(dtype) for _ in range(3))
        seconds = timed(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), device)
        table.append((tokens, 2 * heads * tokens**2 * head_dim / seconds))
    return tuple(table)


def _decode_attention(device: torch.device, dtype: torch.dtype, batch: int = 16, length: int = 1024) -> float:
    heads, kv_heads, head_dim = 8, 4, 64
    q = torch.randn(batch, heads, 1, head_dim, device=device).to(dtype)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, device=device).to(dtype) for _ in range(2))
    seconds = timed(lambda: one_query(q, k, v), device)
    return 2 * k.nbytes / seconds


def _memory_bandwidth(device: torch.device) -> float:
    """Bytes per second of an elementwise product over arrays too large to stay in the caches."""
    x = torch.randn(COLD_BYTES // 8, device=device)
    y, out = torch.randn_like(x), torch.empty_like(x)
    return 3 * x.nbytes / timed(lambda: torch.mul(x, y, out=out), device)


def _op_seconds(device: torch.device) -> float:
    x = torch.ones(8, device=device)
    ops = 100

    def run() -> None:
        for _ in range(ops):
            x.add(1)

    return timed(run, device) / ops


def _dequantize_rate(device: torch.device) -> float:
    """Dequantization through copies of a 16 MB matrix, together larger than the caches (see
    `COLD_BYTES`): a run dequantizes every layer in turn, each found out of the caches."""
    q = quantize(torch.randn(4096, 1024, device=device), CompressionConfig(4, 64, 0))
    copies = COLD_BYTES // (4096 * 1024 * 4)
    pairs = [(replace(q, codes=q.codes.clone()), torch.empty(4096, 1024, device=device)) for _ in range(copies)]
    turn = itertools.cycle(pairs)
    return pairs[0][1].nbytes / timed(lambda: dequantize(*next(turn)), device)


def _transfer(device: torch.device) -> tuple[float, float]:
    host = torch.empty(TRANSFER_BYTES, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(TRANSFER_BYTES, dtype=torch.uint8, device=device)
    h2d = TRANSFER_BYTES / timed(lambda: gpu.copy_(host, non_blocking=True), device)
    d2h = TRANSFER_BYTES / timed(lambda: host.copy_(gpu, non_blocking=True), device)
    return h2d, d2h


def _disk(offload_dir: Path, device: torch.device) -> tuple[float, float, float, float]:
    """Through `DiskTier`, as the engine reads: read bandwidth over files of a layer's size while
    compute runs (as the engine's reads overlap its compute), write bandwidth, the cost of one
    small read, and how much slower compute runs while a worker thread reads (on a two-core
    machine the reads take CPU time from the GEMMs)."""
    offload_dir.mkdir(parents=True, exist_ok=True)
    names = [f"probe{i}" for i in range(DISK_BYTES // DISK_FILE_BYTES)]
    with tempfile.TemporaryDirectory(prefix="flexeval-profile-", dir=offload_dir) as scratch:
        tier = DiskTier(Path(scratch), torch.device("cpu"), durable=True)
        data = torch.randint(0, 255, (DISK_FILE_BYTES,), dtype=torch.uint8)
        # every file its own bytes: storage that deduplicates or caches blocks by content would
        # serve copies of one file from memory (measured here: 2.6 GB/s, against 1.6 for distinct files)
        files = [data + i for i in range(len(names))]
        start = time.perf_counter()
        for name, content in zip(names, files):
            tier.put(name, {"x": content})
        write = DISK_BYTES / (time.perf_counter() - start)
        del files

        def read_all() -> float:
            start = time.perf_counter()
            for name in names:
                tier.release(tier.get(name))
            return time.perf_counter() - start

        read_all()
        rows = torch.arange(0, DISK_FILE_BYTES // 4096, 16) * 4096  # one byte every 64 KiB: a call each
        start = time.perf_counter()
        tier.release(tier.get(names[0], {"x": rows}))
        call = (time.perf_counter() - start) / len(rows)
        slowdown, read = _slowdown_while_reading(read_all, device)
        for name in names:
            tier.evict(name)
    return read, write, call, slowdown


def _slowdown_while_reading(read_all: Callable[[], float], device: torch.device) -> tuple[float, float]:
    """(compute's slowdown, bytes read per second) while a worker reads files and compute runs GEMMs."""
    x, w = torch.randn(64, GEMM_WIDTH, device=device), torch.randn(GEMM_WIDTH, GEMM_WIDTH, device=device)

    def gemms() -> float:
        start = time.perf_counter()
        for _ in range(200):
            F.linear(x, w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    alone = min(gemms() for _ in range(3))
    io = Executors.make(overlap=True)
    try:
        busy = threading.Event()

        def keep_reading() -> tuple[int, float]:
            passes, start = 0, time.perf_counter()
            while not busy.is_set() or passes == 0:
                read_all()
                passes += 1
            return passes, time.perf_counter() - start

        reading = io.weights.submit(keep_reading)
        time.sleep(0.01)
        loaded = statistics.median(gemms() for _ in range(5))
        busy.set()
        passes, seconds = reading.result()
    finally:
        io.shutdown()
    return max(1.0, loaded / alone), passes * DISK_BYTES / seconds


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _meminfo(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
