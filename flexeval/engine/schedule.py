"""The block schedule: one pass of the weights serves every micro-batch of a block.

For each scheduling unit u (a layer, or a block's attention + MLP when `sep_layer` is off):
load its weights once, then run every micro-batch k of the block through it. With overlap,
the next unit's weights are read while unit u computes, and micro-batch k+1's hidden state and
KV cache are fetched while k computes (FlexGen's zig-zag order). Without overlap the very same
loop runs with executors that do each task on the spot: the reference for tests and debugging.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from flexeval.engine.placement import BlockState, Loaded, WeightStore
from flexeval.models.common import KVCache, Layer, Step

CacheMode = Literal["none", "new", "stored"]  # scoring / prefill of a generation / decoding


class Inline(Executor):
    """Runs each task at once in the caller's thread: the schedule without overlap."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:
            future.set_exception(err)
        return future


@dataclass
class Executors:
    """Weights and state (activations, cache) stream on separate workers, so that a big weight
    read never queues in front of a small state fetch; the state worker is FIFO, which orders
    every store of a micro-batch before its next fetch."""

    weights: Executor
    state: Executor

    @classmethod
    def make(cls, overlap: bool) -> Executors:
        if not overlap:
            return cls(Inline(), Inline())
        return cls(ThreadPoolExecutor(1, "flexeval-weights"), ThreadPoolExecutor(1, "flexeval-state"))

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


class Chain:
    """The next pass's first weights, read ahead while a pass ends (the embedding is large)."""

    def __init__(self) -> None:
        self.first: Future | None = None

    def take(self) -> Future:
        first, self.first = self.first, None
        return first

    def close(self, timing: Timing) -> None:
        """Release a read-ahead that no pass will use."""
        if self.first is not None:
            timing.wait(self.take()).release()


def units(layers: Sequence[Layer], sep_layer: bool) -> list[list[int]]:
    """Indices of the layers scheduled together: each alone, or a block's attention with its MLP."""
    if sep_layer:
        return [[j] for j in range(len(layers))]
    grouped: list[list[int]] = []
    for j, layer in enumerate(layers):
        if layer.kind == "mlp" and grouped and layers[grouped[-1][-1]].kind == "attention":
            grouped[-1].append(j)
        else:
            grouped.append([j])
    return grouped


def run_pass(
    layers: Sequence[Layer],
    plan: list[list[int]],
    weights: WeightStore,
    state: BlockState,
    steps: Sequence[Step],
    io: Executors,
    timing: Timing,
    cache_mode: CacheMode = "none",
    new_cache: Callable[[int], KVCache] | None = None,
    chain: Chain | None = None,
    read_ahead: bool = False,
) -> list[Tensor]:
    """One pass over all layers for a block of micro-batches; returns each micro-batch's head output.

    `new_cache(k)` allocates micro-batch k's cache for one transformer block (prefill only).
    With a `chain`, passes chain their reads: with `read_ahead`, the first unit's weights for the
    next pass are read while this pass computes its last unit, and that pass takes them from
    the chain.
    """
    n, last = len(steps), len(plan) - 1

    def fetch(u: int, k: int) -> tuple[Tensor | None, dict[int, KVCache], list[Loaded]]:
        h, loaded = state.load_hidden(k) if u > 0 else (None, Loaded([]))
        caches, handles = {}, [loaded]
        if cache_mode == "stored":
            for block in (layers[j].block for j in plan[u] if layers[j].block is not None):
                caches[block], handle = state.load_cache(block, k)
                handles.append(handle)
        return h, caches, handles

    def store(u: int, k: int, h: Tensor, caches: dict[int, KVCache], handles: list[Loaded]) -> None:
        if u < last:
            state.store_hidden(k, h)
        for block, cache in caches.items():
            state.store_cache(block, k, cache)
        for handle in handles:
            handle.release()

    outputs: list[Tensor] = [None] * n  # type: ignore[list-item]
    next_weights = chain.take() if chain and chain.first else io.weights.submit(weights.load, plan[0])
    next_state = io.state.submit(fetch, 0, 0)
    for u, unit in enumerate(plan):
        loaded = timing.wait(next_weights)
        if u < last or (chain is not None and read_ahead):
            next_weights = io.weights.submit(weights.load, plan[(u + 1) % len(plan)])
        for k in range(n):
            h, caches, handles = timing.wait(next_state)
            following = (u, k + 1) if k + 1 < n else (u + 1, 0)
            if n > 1 and following[0] <= last:  # k+1's input does not depend on this computation
                next_state = io.state.submit(fetch, *following)
            start = time.perf_counter()
            for j, bundle in zip(unit, loaded.bundles):
                layer = layers[j]
                if layer.block is not None and cache_mode == "new":
                    caches[layer.block] = new_cache(k)
                h = layer.forward(bundle, h, steps[k], caches.get(layer.block))
            timing.compute_seconds += time.perf_counter() - start
            if u == last:
                outputs[k] = h
            io.state.submit(store, u, k, h, caches, handles)
            if n == 1 and u < last:
                next_state = io.state.submit(fetch, u + 1, 0)
        loaded.release()
    timing.wait(io.state.submit(lambda: None))  # every store of this pass has landed
    if chain is not None and read_ahead:
        chain.first = next_weights
    return outputs
