"""The block schedule: one pass of the weights serves every micro-batch of a block.

For each scheduling unit u (a layer, or a block's attention + MLP when `sep_layer` is off, or a
slice of the unembedding when `stream_unembedding` is on): load its weights once, then run
every micro-batch k of the block through it. With overlap, the next unit's weights are read
while unit u computes, and micro-batch k+1's hidden state and KV cache are fetched while k
computes (FlexGen's zig-zag order). Without overlap the very same loop runs with executors that
do each task on the spot: the reference for tests and debugging.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flexeval.engine.heap import Heap
from flexeval.engine.placement import BlockState, Loaded, WeightStore
from flexeval.engine.policy import Policy
from flexeval.models.common import Cache, Layer, Step, Weights

CacheMode = Literal["none", "new", "stored"]  # scoring / prefill of a generation / decoding
UNEMBED_SLICE_BYTES = 4 * 2**20  # weights of one vocabulary slice of the unembedding
CPU_CHUNK_TOKENS = 4096  # on the CPU, attention and MLP run a micro-batch this many tokens at a time


WORKERS = ("flexeval-weights", "flexeval-state")


def _single_threaded() -> None:
    torch.set_num_threads(1)
    torch.get_num_threads()  # fixes this thread's count before anyone sets another


class Inline(Executor):
    """Runs each task at once in the caller's thread: the schedule without overlap."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:
            future.set_exception(err)
        return future


class Sequenced(Executor):
    """Another executor's tasks, in its order (a FIFO one), each run only if none before it failed:
    after a failure every later task fails with that very exception. The schedule waits for the
    fetches of state but not for its stores, so a store's error (a full disk) reaches the compute
    thread at its next fetch as itself, not as the KeyError of a fetch that finds nothing stored."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.failure: BaseException | None = None  # read and written by the one thread that runs the tasks

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self.executor.submit(self._run, fn, *args, **kwargs)

    def _run(self, fn, /, *args, **kwargs):
        if self.failure is not None:
            raise self.failure
        try:
            return fn(*args, **kwargs)
        except BaseException as err:
            self.failure = err
            raise


@dataclass
class Executors:
    """Weights and state (activations, cache) stream on separate workers, so that a big weight
    read never queues in front of a small state fetch; the state worker is FIFO, which orders
    every store of a micro-batch before its next fetch."""

    weights: Executor
    state: Executor

    @classmethod
    def make(cls, overlap: bool) -> Executors:
        """With overlap, two worker threads whose torch ops run single-threaded: they move data,
        and an op of theirs that went parallel would bring an OpenMP team of its own onto the
        cores the compute's team is using (measured, 4-bit decoding with weights on disk, two
        cores: 0.37 s a step with two-thread workers, 0.24 s with one). torch's thread count
        is per thread once a thread has used it, but new threads start from the last count
        set anywhere, so the caller's own is set again once the workers hold theirs."""
        if not overlap:
            return cls(Inline(), Inline())
        threads = torch.get_num_threads()
        made = cls(*(ThreadPoolExecutor(1, name, initializer=_single_threaded) for name in WORKERS))
        for worker in (made.weights, made.state):
            worker.submit(int).result()  # started and initialised now
        torch.set_num_threads(threads)
        return made

    def shutdown(self) -> None:
        self.weights.shutdown()
        self.state.shutdown()


@dataclass
class Timing:
    compute_seconds: float = 0.0
    wait_seconds: float = 0.0  # time the compute thread spent waiting for I/O

    def wait(self, future: Future):
        start = time.perf_counter()
        result = future.result()
        self.wait_seconds += time.perf_counter() - start
        return result


@dataclass(frozen=True)
class Unit:
    """Layers whose weights are loaded once and run together over every micro-batch.

    A unit with `vocab` holds a slice [start, stop) of the unembedding, so that the output
    projection streams through a few megabytes at a time; a unit with `tokens` holds the
    embedding, of which only the rows of the pass's tokens are loaded.
    """

    layers: tuple[int, ...]
    vocab: tuple[int, int] | None = None
    tokens: bool = False

    def rows(self, token_ids: Tensor) -> Tensor | None:
        if self.vocab is not None:
            return torch.arange(*self.vocab, device=token_ids.device)
        return token_ids if self.tokens else None


def units(layers: Sequence[Layer], policy: Policy, dtype: torch.dtype) -> list[Unit]:
    """The schedule's units: each layer alone, or a block's attention with its MLP (`sep_layer`
    off); the unembedding whole, or cut into even vocabulary slices of at most `UNEMBED_SLICE_BYTES`
    (`stream_unembedding`), whose reads then overlap the unembedding's own compute. Even, because a
    product a few columns wide runs other BLAS kernels, with rounding of its own (`flexeval.reproducible`)."""
    grouped: list[Unit] = []
    for j, layer in enumerate(layers):
        by_token = [p for p in layer.params.values() if p.by_token]
        if layer.kind == "unembed" and not policy.stream_unembedding:
            grouped.append(Unit((j,)))
        elif layer.kind == "unembed":
            vocab, row_bytes = by_token[0].shape[0], by_token[0].nbytes(dtype) // by_token[0].shape[0]
            count = -(-vocab // max(1, UNEMBED_SLICE_BYTES // row_bytes))
            bounds = [vocab * i // count for i in range(count + 1)]  # even: no narrow last slice
            grouped += [Unit((j,), (a, b)) for a, b in zip(bounds, bounds[1:])]
        elif layer.kind == "mlp" and not policy.sep_layer and layers[grouped[-1].layers[-1]].kind == "attention":
            grouped[-1] = Unit((*grouped[-1].layers, j))
        else:
            grouped.append(Unit((j,), tokens=bool(by_token)))
    return grouped


def run_pass(
    layers: Sequence[Layer],
    plan: Sequence[Unit],
    weights: WeightStore,
    state: BlockState,
    steps: Sequence[Step],
    io: Executors,
    timing: Timing,
    cache_mode: CacheMode = "none",
    new_cache: Callable[[int], Cache] | None = None,
    heap: Heap | None = None,
    on_unit: Callable[[int], None] | None = None,
) -> list[Tensor]:
    """One pass over all layers for a block of micro-batches; returns each step's readout result.

    `new_cache(k)` allocates micro-batch k's cache for one transformer block (prefill only);
    `heap`, under a RAM budget (`Policy.bound_heap`), is settled after every unit; `on_unit(u)`
    is told when unit u is done (progress within a pass).
    """
    run = _Pass(layers, plan, weights, state, steps, io, timing, cache_mode, new_cache)
    next_weights = run.load(0)
    next_state = run.state_io.submit(run.fetch, 0, 0)
    for u in range(len(plan)):
        loaded = timing.wait(next_weights)
        if u < run.last:
            next_weights = run.load(u + 1)
        start = time.perf_counter()
        weights.dequantize(loaded, decoding=steps[0].cache_start > 0)
        timing.compute_seconds += time.perf_counter() - start
        next_state = run.unit(u, loaded, next_state)
        loaded.release()
        if heap is not None:
            heap.settle()
        if on_unit is not None:
            on_unit(u)
    timing.wait(run.state_io.submit(lambda: None))  # every store of this pass has landed
    return [step.readout.result() for step in steps]


State = tuple[Tensor | None, dict[int, Cache], list[Loaded]]  # a micro-batch's hidden state, caches, their handles


@dataclass
class _Pass:
    """What the tasks of one `run_pass` share: they run on the I/O workers as well as on the
    compute thread, so they take their context from here rather than from arguments."""

    layers: Sequence[Layer]
    plan: Sequence[Unit]
    weights: WeightStore
    state: BlockState
    steps: Sequence[Step]
    io: Executors
    timing: Timing
    cache_mode: CacheMode
    new_cache: Callable[[int], Cache] | None

    def __post_init__(self) -> None:
        if self.cache_mode == "new" and self.new_cache is None:
            raise ValueError("run_pass: cache_mode 'new' allocates caches, so it needs new_cache")
        self.last = len(self.plan) - 1
        self.token_ids = torch.unique(torch.cat([step.ids.flatten() for step in self.steps]).cpu())  # sorted
        self.inline = Inline()  # what moves nothing is done on the spot: a thread hand-off would cost more
        # stores are not waited for: see `Sequenced`
        self.state_io = Sequenced(self.io.state if self.state.moves else self.inline)

    def load(self, u: int) -> Future:
        """Unit u's weights, read on the weights' worker when that copies, so that the read overlaps
        the compute of the unit before."""
        executor = self.io.weights if self.weights.moves(self.plan[u].layers) else self.inline
        return executor.submit(self.weights.load, self.plan[u].layers, self.plan[u].rows(self.token_ids))

    def fetch(self, u: int, k: int) -> State:
        """Micro-batch k's input to unit u: the first unit has none, and only decoding reads caches
        back (a prefill makes them)."""
        h, loaded = self.state.load_hidden(k) if u > 0 else (None, Loaded([]))
        caches, handles = {}, [loaded]
        if self.cache_mode == "stored":
            for block in (self.layers[j].block for j in self.plan[u].layers if self.layers[j].block is not None):
                caches[block], handle = self.state.load_cache(block, k, values=not self.steps[k].sparse)
                handles.append(handle)
        return h, caches, handles

    def store(self, u: int, k: int, h: Tensor, changed: bool, caches: dict[int, Cache], handles: list[Loaded]) -> None:
        """Keep what the next unit needs: the last unit's output is read out, not passed on, and a
        decoding step only wrote its own columns of each cache."""
        if u < self.last and changed:
            self.state.store_hidden(k, h)
        step = self.steps[k]
        columns = (step.cache_start, step.cache_start + step.ids.shape[1])
        for block, cache in caches.items():
            self.state.store_cache(block, k, cache, columns if self.cache_mode == "stored" else None)
        for handle in handles:
            handle.release()

    def unit(self, u: int, loaded: Loaded, next_state: Future) -> Future:
        """Every micro-batch through unit u, each one's successor fetched while it computes (FlexGen's
        zig-zag); returns the fetch of the next unit's first micro-batch, already under way."""
        n = len(self.steps)
        for k in range(n):
            h, caches, handles = self.timing.wait(next_state)
            following = (u, k + 1) if k + 1 < n else (u + 1, 0)
            if n > 1 and following[0] <= self.last:  # k+1's input does not depend on this computation
                next_state = self.state_io.submit(self.fetch, *following)
            start, given = time.perf_counter(), h
            h = self.compute(u, k, loaded, h, caches)
            self.timing.compute_seconds += time.perf_counter() - start
            self.state_io.submit(self.store, u, k, h, h is not given, caches, handles)
            if n == 1 and u < self.last:  # a lone micro-batch's next input is this output, stored
                next_state = self.state_io.submit(self.fetch, u + 1, 0)
        return next_state

    def compute(self, u: int, k: int, loaded: Loaded, h: Tensor | None, caches: dict[int, Cache]) -> Tensor:
        """Micro-batch k through unit u's layers; a prefill makes each attention layer's cache as it
        reaches it, so that only one block's caches are alive beside the weights."""
        for j, bundle in zip(self.plan[u].layers, loaded.bundles):
            layer = self.layers[j]
            if layer.block is not None and self.cache_mode == "new":
                caches[layer.block] = self.new_cache(k)
            h = forward(layer, bundle, h, self.steps[k], caches.get(layer.block))
        return h


def forward(layer: Layer, bundle: Weights, h: Tensor | None, step: Step, cache: Cache | None) -> Tensor:
    """One layer over one micro-batch. On the CPU, a large prefill's attention and MLP run a few
    sequences at a time, so that their elementwise work (norms, rotary, activations: a third of
    prefill time) stays in the caches instead of streaming activations of hundreds of megabytes
    through memory; the GEMMs keep thousands of rows. A big micro-batch then costs no prefill
    speed, while decoding (one token per sequence) keeps all of its rows in each GEMM."""
    if h is None or h.device.type != "cpu" or layer.kind not in ("attention", "mlp"):
        return layer.forward(bundle, h, step, cache)
    rows = max(1, CPU_CHUNK_TOKENS // h.shape[1])
    if h.shape[0] <= rows:
        return layer.forward(bundle, h, step, cache)
    parts = [
        layer.forward(
            bundle, h[a : a + rows], step.rows(a, a + rows), None if cache is None else cache.rows(a, a + rows)
        )
        for a in range(0, h.shape[0], rows)
    ]
    return torch.cat(parts)
