"""The cost model: the seconds and the per-tier memory a policy will take for a workload.

FlexGen's model, on the engine's own schedule. For each scheduling unit (`schedule.units`) a
pass over a block costs its arithmetic over every micro-batch (the profile's rates, fitted to
the model's own layers as measured on the machine), plus the bytes moved on each channel (disk,
CPU→GPU, GPU→CPU); with overlap a unit takes the longest of its compute and the reads beside it
(the next unit's weights, its micro-batches' state), without it their sum. Prefill is one pass
per block, decoding one pass per new token; score-only workloads (lm-eval's log-likelihoods)
are prefill alone, with logits read at the scored positions only.
Peak memory per tier is what the tiers would hold (weights, a block's KV cache and hidden
states) plus, on the compute tier, the working memory of one micro-batch's layer and the
staging of the units being loaded, in the units `RunStats.tiers` reports.

Everything that depends on where tensors live is linear in the policy's placement fractions
(`Term`), so the same costs give the search (`search.py`) the rows of a linear program, and
`predict` evaluates a concrete policy with its weights placed exactly, tensor by tensor.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.optimize import nnls

from flexeval.engine.batch import cut_blocks
from flexeval.engine.placement import (
    WeightKey,
    act_placement,
    cache_placement,
    compression,
    placed_tiers,
    stored_nbytes,
    weight_bytes_per_tier,
)
from flexeval.engine.policy import Policy, TensorClass
from flexeval.engine.schedule import CPU_CHUNK_TOKENS, Unit, units
from flexeval.engine.tiers import ALIGN as PAGE
from flexeval.engine.tiers import pool_pick
from flexeval.models.common import LOGITS_CHUNK_BYTES, LOGITS_CHUNK_ROWS, Model, Param
from flexeval.planning.hardware import HardwareProfile
from flexeval.planning.timing import LayerTimes
from flexeval.quantization.compression import quantized_nbytes

TIERS = ("compute", "cpu", "disk")
CHANNELS = ("disk", "h2d", "d2h")
# The LP's variables: the cpu and disk shares of each tensor class (the compute share is the rest).
FRACTIONS = ("w_cpu", "w_disk", "cache_cpu", "cache_disk", "act_cpu", "act_disk")
# Elementwise passes over a token's hidden state (norms, rotary, residuals, splits) and over its
# MLP activations, in bytes read and written per element, and small ops launched per layer call:
# counted from the layers' code (models/llama.py), and checked against measured compute times
# (benchmarks/cost_model.py).
HIDDEN_PASSES = {"attention": 24, "mlp": 8, "head": 4, "embed": 2}
INTERMEDIATE_PASSES = 10
RUN_OPS = 10  # per run of equally padded sequences in CPU attention (one SDPA call each)
UNIT_OPS = 30  # the schedule's own work per unit and micro-batch (futures, bookkeeping)
READOUT_PASSES = 4  # passes over fp32 logits: log_softmax, gather, argmax
# What a process's resident memory shows beyond the live tensors counted here, measured with
# benchmarks/auto_memory.py: the allocator's fragmentation and reuse over a layer's temporaries
# (its working memory counted at 1.5 times), and 32 MB for the run's small tensors and objects
# and the noise between processes: glibc's heap lays the same allocations out differently under
# each address-space randomisation, and one policy streaming weights from disk peaked anywhere
# from 112 to 152 MB over 40 runs (AMD EPYC; with 16 MB here a 135 MB budget was overshot by
# 17 % in CI). A fixed mmap threshold makes the peak repeatable (104.5 MB every run) but costs
# 10-20 % of compute speed in page faults.
WORKING_MARGIN = 1.5
RUNTIME_BYTES = 32 * 2**20
Block = tuple[tuple[int, int], ...]  # a block's micro-batches: (sequences, padded length) each


@dataclass(frozen=True)
class Workload:
    """What a run computes: `sequences` of `prompt_len` tokens, each then generating `gen_len`
    (0: score-only, as lm-eval's log-likelihoods). `scored` tokens of each sequence need logits
    (score-only; None: every token). `continuations` packed per context (a multiple-choice
    document's endings) make attention masked; `uniform` sequences all have `prompt_len` tokens,
    while a task's vary, and CPU attention then runs once per sequence. `lengths`, when known (a
    task's requests, counted), are each sequence's own: the engine pads a micro-batch to its
    longest and caps its tokens (`Policy.gpu_batch_tokens`), which a mean length cannot show
    (PIQA's first 200 documents, 57 tokens a sequence on average, in blocks of 8: 39 micro-batches
    under the cap, not the 25 a mean length gives; the prediction was 47 % fast)."""

    sequences: int
    prompt_len: int
    gen_len: int = 0
    scored: int | None = None
    continuations: int = 1
    uniform: bool = False
    lengths: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def counted(
        cls, lengths: Sequence[int], gen_len: int = 0, scored: Sequence[int] = (), endings: int = 0
    ) -> Workload:
        """A task's requests as the backend runs them: each sequence's length, and (score-only)
        the tokens each scores and the endings packed into them all."""
        n = len(lengths)
        return cls(
            sequences=n,
            prompt_len=max(1, round(sum(lengths) / n)),
            gen_len=gen_len,
            scored=max(1, round(sum(scored) / n)) if endings else None,
            continuations=max(1, round(endings / n)),
            lengths=tuple(lengths),
        )

    def __post_init__(self) -> None:
        if self.lengths and len(self.lengths) != self.sequences:
            raise ValueError(f"{len(self.lengths)} lengths given for {self.sequences} sequences")

    @property
    def tokens(self) -> int:
        """What throughput counts: new tokens when generating (FlexGen's figure), else tokens scored."""
        if self.gen_len:
            return self.sequences * self.gen_len
        return sum(self.lengths) if self.lengths else self.sequences * self.prompt_len

    def longest_first(self) -> list[int]:
        return sorted(self.lengths, reverse=True) if self.lengths else [self.prompt_len] * self.sequences


@dataclass
class Breakdown:
    """One stage's time: its arithmetic, the time each channel is busy, and the total, which
    overlap makes less than their sum."""

    seconds: float = 0.0
    compute: float = 0.0
    io: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0.0))

    def add(self, other: Breakdown, times: float = 1.0) -> None:
        self.seconds += times * other.seconds
        self.compute += times * other.compute
        for channel in CHANNELS:
            self.io[channel] += times * other.io[channel]


@dataclass
class Prediction:
    """What the cost model expects of a policy on a workload."""

    seconds: float
    tokens_per_second: float
    prefill: Breakdown
    decode: Breakdown
    peak_bytes: dict[str, int]  # tier -> bytes

    def as_dict(self) -> dict:
        stage = lambda b: {"seconds": b.seconds, "compute_seconds": b.compute, "io_seconds": dict(b.io)}  # noqa: E731
        return {
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "prefill": stage(self.prefill),
            "decode": stage(self.decode),
            "peak_bytes": dict(self.peak_bytes),
        }


@dataclass(frozen=True)
class Term:
    """A quantity linear in the placement fractions: constant + coefficients · FRACTIONS."""

    constant: float = 0.0
    coefficients: np.ndarray = field(default_factory=lambda: np.zeros(len(FRACTIONS)))

    def __add__(self, other: Term) -> Term:
        return Term(self.constant + other.constant, self.coefficients + other.coefficients)

    def __mul__(self, factor: float) -> Term:
        return Term(self.constant * factor, self.coefficients * factor)

    def at(self, fractions: np.ndarray) -> float:
        return float(self.constant + self.coefficients @ fractions)


def term(**coefficients: float) -> Term:
    vector = np.zeros(len(FRACTIONS))
    for name, value in coefficients.items():
        vector[FRACTIONS.index(name)] = value
    return Term(0.0, vector)


@dataclass(frozen=True)
class UnitCost:
    """One scheduling unit over one pass of a block: `count` identical units in the LP's view.
    A unit's weights are read while the unit before it computes, so it carries the reads of the
    next unit's (`prefetch`); the first unit of a pass waits for its own. The hidden states and
    caches of its micro-batches move while the previous micro-batch computes."""

    unit: Unit
    kind: str
    count: int
    compute: float  # seconds
    weights: dict[str, Term]  # channel -> seconds: this unit's own weights
    prefetch: dict[str, Term]  # the next unit's weights, read during this unit's compute
    state: dict[str, Term]
    first: bool

    def io(self, fractions: np.ndarray) -> dict[str, float]:
        return {ch: self.weights[ch].at(fractions) + self.state[ch].at(fractions) for ch in CHANNELS}


@dataclass(frozen=True)
class Stage:
    """One pass of a block in a stage: its units, run `passes` times per block."""

    units: list[UnitCost]
    passes: float


class CostModel:
    """A model's costs on a machine for a workload, for any policy (see module docstring)."""

    def __init__(
        self, model: Model, dtype: torch.dtype, profile: HardwareProfile, layers: LayerTimes, workload: Workload
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.profile = profile
        self.workload = workload
        self.cuda = profile.device == "cuda"
        self.width = model.hidden_size
        self.heads = max(1, self.width // model.head_dim)
        mlp = next(layer for layer in model.layers if layer.kind == "mlp")
        # each MLP matrix's side beyond the width: (2I, I) with Llama's fused gate/up, (I, I) for OPT
        inner = [max(p.shape) for p in mlp.params.values() if len(p.shape) == 2]
        self.intermediate = min(inner)
        self.mlp_inner = sum(inner)  # what is alive at the MLP's peak: 3I while SwiGLU multiplies, 2I for OPT
        self.fits = {tuple(key.split("/")): self._fit(key, measured) for key, measured in layers.items()}
        self._blocks: dict[tuple[int, int, int], Counter[Block]] = {}
        self._batches: dict[tuple[int, int, int], Counter[tuple[int, int]]] = {}
        self._seconds: dict[tuple[str, bool, int, int], float] = {}

    def _fit(self, key: str, measured: list[tuple[int, int, float]]) -> tuple[float, float]:
        """(scale, seconds per call) that turn `arithmetic` into a layer's measured seconds:
        non-negative least squares over the measured shapes."""
        kind, phase = key.split("/")
        rows = [self.arithmetic(kind, b, n, phase == "decode") for b, n, _ in measured]
        scale_overhead, _ = nnls(np.array(rows, dtype=float), np.array([t for _, _, t in measured]))
        return float(scale_overhead[0]), float(scale_overhead[1])

    # --- the two stages -------------------------------------------------------------------

    def stages(self, policy: Policy, exact: bool = False) -> list[Stage]:
        """Prefill and decoding: identical units grouped, weights by the placement fractions (the
        LP's view), or (`exact`) unit by unit with each tensor's bytes where it really goes."""
        w = self.workload
        plan = units(self.model.layers, policy, self.dtype)
        placed = placed_tiers(self.model.layers, policy, self.dtype) if exact else None
        prefill = Stage(self._unit_costs(plan, policy, False, placed), 1)
        if w.gen_len <= 1:
            return [prefill]
        decode = Stage(self._unit_costs(plan, policy, True, placed), w.gen_len - 1)
        return [prefill, decode]

    def blocks(self, policy: Policy) -> int:
        return sum(self.shapes(policy).values())

    def shapes(self, policy: Policy) -> Counter[Block]:
        """The run's blocks, counted, each as its micro-batches' (sequences, padded length): the
        engine cuts all of a call's sequences at once (`batch.cut_blocks`), and so does this."""
        key = (policy.gpu_batch_size, policy.gpu_batch_tokens, policy.num_gpu_batches)
        if key not in self._blocks:
            prompts, gen = self.workload.longest_first(), self.workload.gen_len
            cut = cut_blocks(
                [n + gen for n in prompts], policy.gpu_batch_size, policy.gpu_batch_tokens, policy.num_gpu_batches
            )
            self._blocks[key] = Counter(tuple((len(batch), prompts[batch[0]]) for batch in block) for block in cut)
        return self._blocks[key]

    def batches(self, policy: Policy) -> Counter[tuple[int, int]]:
        """The run's micro-batches, counted, each as (sequences, padded length)."""
        key = (policy.gpu_batch_size, policy.gpu_batch_tokens, policy.num_gpu_batches)
        if key not in self._batches:
            found: Counter[tuple[int, int]] = Counter()
            for block, count in self.shapes(policy).items():
                for batch in block:
                    found[batch] += count
            self._batches[key] = found
        return self._batches[key]

    def mean_block(self, policy: Policy, of: Callable[[int, int], float]) -> float:
        """The mean over the run's blocks of `of(sequences, padded length)` summed over a block's
        micro-batches: what time follows."""
        return sum(of(*batch) * count for batch, count in self.batches(policy).items()) / self.blocks(policy)

    def largest_block(self, policy: Policy, of: Callable[[int, int], float]) -> float:
        """The largest block's `of(sequences, padded length)` summed over its micro-batches: what
        memory follows."""
        return max(sum(of(*batch) for batch in block) for block in self.shapes(policy))

    def bounds(self, cost: UnitCost, policy: Policy) -> list[Term]:
        """Lower bounds of a unit's seconds, each linear in the placement fractions; its time is
        the largest. Without overlap everything adds up. With overlap, each channel is busy for
        the next unit's weights and this unit's state, and compute, slowed by the disk reads
        beside it (`HardwareProfile.read_slowdown`), also waits for the state of a block of one
        micro-batch, whose next fetch follows its store; the first unit of a pass first waits
        for its own weights."""
        state = sum(cost.state.values(), Term())
        if not policy.overlap:
            return [sum(cost.weights.values(), Term(cost.compute)) + state]
        computing = Term(cost.compute) + cost.prefetch["disk"] * (self.profile.read_slowdown - 1)
        if policy.num_gpu_batches == 1:
            computing = computing + state
        waits = sum(cost.weights.values(), Term()) if cost.first else Term()
        return [waits + computing] + [waits + cost.prefetch[ch] + cost.state[ch] for ch in CHANNELS]

    def predict(self, policy: Policy) -> Prediction:
        """Time and memory of a concrete policy, its weights placed exactly as `WeightStore` will."""
        fractions = self.fractions(policy)
        breakdowns = []
        for stage in self.stages(policy, exact=True):
            total = Breakdown()
            for cost in stage.units:
                seconds = max(bound.at(fractions) for bound in self.bounds(cost, policy))
                total.add(Breakdown(seconds, cost.compute, cost.io(fractions)), cost.count)
            whole = Breakdown()
            whole.add(total, stage.passes * self.blocks(policy))
            breakdowns.append(whole)
        prefill, decode = breakdowns[0], breakdowns[1] if len(breakdowns) > 1 else Breakdown()
        seconds = prefill.seconds + decode.seconds
        peaks = self.peaks(policy, placed_tiers(self.model.layers, policy, self.dtype))
        stored = self.weight_bytes(policy)
        peak = {t: int(peaks[t].at(fractions) + stored[i]) for i, t in enumerate(TIERS)}
        return Prediction(seconds, self.workload.tokens / seconds, prefill, decode, peak)

    def fractions(self, policy: Policy) -> np.ndarray:
        """The placement fractions of a concrete policy, the KV cache's and activations' as their
        units really go (`placement.cache_placement`, `placement.act_placement`)."""
        shares = {kind: policy.split(kind) for kind in TensorClass}
        shares[TensorClass.CACHE] = _counted(
            list(cache_placement(policy, policy.num_gpu_batches, self.model.num_blocks).values())
        )
        shares[TensorClass.ACT] = _counted(act_placement(policy, policy.num_gpu_batches))
        pairs = (name.split("_") for name in FRACTIONS)
        return np.array([shares[TensorClass(kind)][1 if tier == "cpu" else 2] for kind, tier in pairs])

    # --- memory ------------------------------------------------------------------------------

    def weight_bytes(self, policy: Policy) -> list[float]:
        """Stored weight bytes per tier, placed exactly as `WeightStore` places them."""
        return [float(size) for size in weight_bytes_per_tier(self.model.layers, policy, self.dtype)]

    def weight_terms(self, policy: Policy) -> dict[str, Term]:
        """Stored weight bytes per tier as the LP sees them: the total times each tier's fraction."""
        total = sum(self.weight_bytes(policy))
        return {
            "compute": Term(total) + term(w_cpu=-total, w_disk=-total),
            "cpu": term(w_cpu=total),
            "disk": term(w_disk=total),
        }

    def peaks(self, policy: Policy, placed: dict[WeightKey, int] | None = None) -> dict[str, Term]:
        """Per tier, peak bytes besides the stored weights (which `weight_bytes` gives): a block's
        cache and hidden states by their fractions, and the compute tier's working memory, whose
        staging of weights follows the fractions (the LP's view) or the weights `placed`."""
        cache, act = self.cache_bytes(policy), self.act_bytes(policy)
        state = {
            "compute": Term(cache + act) + term(cache_cpu=-cache, cache_disk=-cache, act_cpu=-act, act_disk=-act),
            "cpu": term(cache_cpu=cache, act_cpu=act),
            "disk": term(cache_disk=cache, act_disk=act),
        }
        staged = self._staging(policy, placed)
        state["compute"] = state["compute"] + self._working(policy) + staged["compute"]
        state["cpu"] = state["cpu"] + staged["cpu"]
        return state

    def cache_bytes(self, policy: Policy) -> float:
        """The largest block's KV cache, every layer and micro-batch (0 for score-only workloads)."""
        return (
            self.largest_block(policy, lambda rows, width: self._layer_cache(policy, rows, width))
            * self.model.num_blocks
        )

    def _layer_cache(self, policy: Policy, rows: int, width: int) -> float:
        """One layer's keys and values for a micro-batch of `rows` prompts padded to `width`."""
        w = self.workload
        if w.gen_len == 0:
            return 0.0
        shape = (rows, self.model.kv_heads, width + w.gen_len, self.model.head_dim)
        per_part = (
            quantized_nbytes(shape, self.dtype, policy.comp_cache_config)
            if policy.compress_cache
            else math.prod(shape) * self.dtype.itemsize
        )
        return 2.0 * per_part

    def act_bytes(self, policy: Policy) -> float:
        """The hidden states the largest block keeps between units: one per micro-batch."""
        return self.largest_block(policy, lambda rows, width: rows * width * self.width * self.dtype.itemsize)

    def _working(self, policy: Policy) -> Term:
        """Compute-tier bytes beyond what the tiers store and stage (`_staging`): the largest
        micro-batch's layer at work, its hidden states, the logits it reads out, a decoding step's
        cache on CUDA."""
        vocab = self._vocab_slice(policy)
        return Term(max(self._batch_working(policy, b, s, vocab) for b, s in self.batches(policy)) + RUNTIME_BYTES)

    def _batch_working(self, policy: Policy, b: int, s: int, vocab: int) -> float:
        """`_working` of one micro-batch of b sequences padded to s tokens, `vocab` logits a row at once."""
        w, item = self.workload, self.dtype.itemsize
        rows = min(b, max(1, CPU_CHUNK_TOKENS // s)) * s if not self.cuda else b * s
        # attention or the MLP at its peak, whichever is wider
        per_row = max(3 * self.width + 2 * self.heads * self.model.head_dim, 2 * self.width + self.mlp_inner)
        layer = rows * item * per_row
        if w.continuations > 1 or self.cuda:  # a mask: attention materialises its scores
            layer += (rows // s) * self.heads * s * s * 4 + b * s * s
        hidden = 3 * b * s * self.width * item
        head_rows = b * self._scored(s) if w.gen_len == 0 else b
        chunk = min(head_rows, max(LOGITS_CHUNK_ROWS, LOGITS_CHUNK_BYTES // (self.model.vocab_size * 4)))
        logits = READOUT_PASSES * chunk * vocab * 4
        decode_cache = 0.0
        if w.gen_len > 1 and self.cuda:  # a micro-batch's cache of one block fetched, and the next
            decode_cache = 2 * self._layer_cache(policy, b, s)
        return WORKING_MARGIN * (layer + hidden + logits) + decode_cache

    def _scored(self, width: int) -> int:
        """Tokens read out of a sequence padded to `width` (score-only): the workload's share."""
        w = self.workload
        return width if w.scored is None else min(width, max(1, round(w.scored * width / w.prompt_len)))

    def _staging(self, policy: Policy, placed: dict[WeightKey, int] | None) -> dict[str, Term]:
        """Buffers that weights pass through: read from disk into a tier's pool (on the CPU only
        disk reads stage; under CUDA every upload lands in compute memory, and disk reads first
        in pinned CPU memory), then dequantized into the weight store's pool. Pools keep their
        buffers, so what they hold is what `_pooled` finds a pass of the schedule makes them
        allocate: the LP takes it for everything on disk, times the disk fraction."""
        plan = units(self.model.layers, policy, self.dtype)
        in_flight = 1 + policy.overlap
        if placed is None:
            every = [self._unit_stored(unit, policy) for unit in plan]
            pooled = _pooled(every, in_flight)
            staged = {"compute": term(w_cpu=pooled, w_disk=pooled) if self.cuda else term(w_disk=pooled)}
            staged["cpu"] = term(w_disk=pooled) if self.cuda else Term()
        else:
            on = {tier: {k for k, t in placed.items() if t == tier} for tier in (1, 2)}
            disk = [self._unit_stored(unit, policy, on[2]) for unit in plan]
            moved = [self._unit_stored(unit, policy, on[1] | on[2]) for unit in plan]
            staged = {"compute": Term(_pooled(moved if self.cuda else disk, in_flight))}
            staged["cpu"] = Term(_pooled(disk, in_flight) if self.cuda else 0.0)
        # a micro-batch's cache of one layer, and its hidden state, read from disk into the
        # cache's and activations' own pools, the next one's beside it
        one_cache = self.cache_bytes(policy) / self.model.num_blocks / policy.num_gpu_batches
        one_hidden = self.act_bytes(policy) / policy.num_gpu_batches
        staged["compute"] = staged["compute"] + term(
            cache_disk=_pooled([one_cache], in_flight), act_disk=_pooled([one_hidden], in_flight)
        )
        if policy.compress_weight or policy.native_weights:  # dequantized on the compute thread, one unit at a time
            full = [self._unit_dense(unit, policy) for unit in plan]
            staged["compute"] = staged["compute"] + Term(_pooled(full, 1) if not self.cuda else max(full))
        return staged

    def _unit_dense(self, unit: Unit, policy: Policy, kernel_decodes: bool = False) -> float:
        """Bytes of a unit's quantizable weights once dequantized; with `kernel_decodes`, less
        those the int4 kernel multiplies as codes."""

        def dequantized(param: Param) -> bool:
            config = compression(param, policy)
            return len(param.shape) > 1 and not (kernel_decodes and config is not None and config.tiled)

        return sum(
            param.nbytes(self.dtype) * self._read_share(unit, param.by_token, policy)
            for j in unit.layers
            for param in self.model.layers[j].params.values()
            if dequantized(param)
        )

    # --- time --------------------------------------------------------------------------------

    def _unit_costs(
        self, plan: Sequence[Unit], policy: Policy, decoding: bool, placed: dict[WeightKey, int] | None
    ) -> list[UnitCost]:
        """Every unit's costs, units alike in kind, size, slice (and, `placed`, in the bytes that
        arrive from each tier) costed once and counted."""
        grouped: dict[tuple, UnitCost] = {}
        weights = [self._weight_io(unit, policy, placed) for unit in plan]
        nothing = {ch: Term() for ch in CHANNELS}
        for u, unit in enumerate(plan):
            kinds = tuple(self.model.layers[j].kind for j in unit.layers)
            width = None if unit.vocab is None else unit.vocab[1] - unit.vocab[0]
            size = sum(self.model.layers[j].nbytes(self.dtype) for j in unit.layers)
            prefetch = weights[u + 1] if u + 1 < len(plan) else nothing
            key = (u == 0, kinds, width, unit.tokens, size, _signature(weights[u]), _signature(prefetch))
            if key in grouped:
                grouped[key] = replace(grouped[key], count=grouped[key].count + 1)
                continue
            compute = sum(self._compute(kind, policy, decoding, unit) for kind in kinds)
            compute += self._dequantize_seconds(
                unit, policy, decoding
            ) + UNIT_OPS * self.profile.op_seconds * self.mean_block(policy, lambda rows, width: 1)
            state = self._state_io(unit, list(kinds), policy, decoding)
            grouped[key] = UnitCost(unit, "+".join(kinds), 1, compute, weights[u], prefetch, state, first=u == 0)
        return list(grouped.values())

    def _compute(self, kind: str, policy: Policy, decoding: bool, unit: Unit) -> float:
        """Seconds of one layer's arithmetic over every micro-batch of the mean block."""
        seconds = self.mean_block(policy, lambda rows, width: self._batch_seconds(kind, decoding, rows, width))
        if unit.vocab is not None:  # a streamed slice: its share of the whole unembedding's time
            seconds *= (unit.vocab[1] - unit.vocab[0]) / self.model.vocab_size
        if kind == "attention":
            seconds += self.mean_block(policy, lambda rows, width: self._attention_extra(policy, decoding, rows, width))
        return seconds

    def _batch_seconds(self, kind: str, decoding: bool, b: int, width: int) -> float:
        """One layer over a micro-batch of b sequences padded to `width`: its analytic arithmetic
        and calls, scaled by the fit to this layer's measured times (remembered: a search asks
        for the same micro-batches under many policies)."""
        key = (kind, decoding, b, width)
        if key not in self._seconds:
            w = self.workload
            n = int(width + w.gen_len / 2) if decoding else width
            head_rows = b if decoding or w.gen_len else b * self._scored(width)
            arithmetic, calls = self.arithmetic(kind, b, n, decoding, head_rows)
            scale, overhead = self.fits[kind, "decode" if decoding else "prefill"]
            self._seconds[key] = scale * arithmetic + overhead * calls
        return self._seconds[key]

    def arithmetic(self, kind: str, b: int, n: int, decoding: bool, head_rows: int | None = None) -> tuple[float, int]:
        """(seconds by the profile's rates, calls) of one layer over b sequences of n new tokens,
        or (decoding) one token after n cached: GEMMs at the rows they get (the CPU runs prefill
        a few sequences at a time, see `schedule.forward`), attention, elementwise passes, the
        readout of the logits; calls count what costs dispatch time regardless of size."""
        p, item = self.profile, self.dtype.itemsize
        s = 1 if decoding else n
        tokens = b * s
        rows = tokens if self.cuda or decoding else min(b, max(1, CPU_CHUNK_TOKENS // s)) * s
        layer = next(layer for layer in self.model.layers if layer.kind == kind)
        if kind == "unembed":
            head_rows = b * s if head_rows is None else head_rows
            vocab = self.model.vocab_size
            chunk = min(head_rows, max(LOGITS_CHUNK_ROWS, LOGITS_CHUNK_BYTES // (self.model.vocab_size * 4)))
            table = vocab * self.width * item * math.ceil(head_rows / chunk)  # read once per chunk of rows
            seconds = max(
                p.gemm_seconds(chunk, 2 * head_rows * vocab * self.width, self.dtype), table / p.memory_bandwidth
            )
            seconds += READOUT_PASSES * head_rows * vocab * 4 / p.memory_bandwidth
            return seconds, math.ceil(head_rows / chunk)
        matrices = sum(math.prod(q.shape) for q in layer.params.values() if len(q.shape) == 2 and not q.by_token)
        # a GEMM streams its weights from memory at least once per chunk of rows
        seconds = max(p.gemm_seconds(rows, 2 * tokens * matrices, self.dtype), matrices * item / p.memory_bandwidth)
        seconds += HIDDEN_PASSES.get(kind, 0) * tokens * self.width * item / p.memory_bandwidth
        if kind == "mlp":
            seconds += INTERMEDIATE_PASSES * tokens * self.intermediate * item / p.memory_bandwidth
        if kind == "attention" and decoding:
            cache = 2 * b * self.model.kv_heads * n * self.model.head_dim * item
            seconds += p.decode_attention_seconds(cache, self.dtype)
        elif kind == "attention":
            seconds += p.attention_seconds(s, 2 * b * self.heads * s * s * self.model.head_dim, self.dtype)
        return seconds, math.ceil(tokens / rows)

    def _attention_extra(self, policy: Policy, decoding: bool, b: int, width: int) -> float:
        """What attention costs beyond the fitted layer, for a micro-batch of b sequences padded to
        `width`: an SDPA call per run of equally padded sequences on the CPU (a task's lengths
        vary), dequantizing a compressed cache, and attention delegated to a CPU-resident cache
        (CUDA)."""
        p = self.profile
        seconds = 0.0 if self.workload.uniform or self.cuda else p.op_seconds * RUN_OPS * (b - 1)
        if not decoding:
            return seconds
        n = int(width + self.workload.gen_len / 2)
        cache = 2 * b * self.model.kv_heads * n * self.model.head_dim * self.dtype.itemsize
        if policy.compress_cache:
            seconds += cache / p.dequantize
        if self.cuda and policy.cpu_cache_compute:
            share = policy.split(TensorClass.CACHE)[1]
            seconds += share * (
                p.decode_attention_seconds(cache, self.dtype, on_cpu=True)
                - p.decode_attention_seconds(cache, self.dtype)
            )
        return seconds

    def _dequantize_seconds(self, unit: Unit, policy: Policy, decoding: bool) -> float:
        """Decoding on the CPU multiplies tiled codes with the int4 kernel instead (`quantization.int4mm`),
        whose products the model costs as the dtype's GEMMs: at the few rows of a decoding step
        they take about as long (Llama-2-7B shapes, 8 rows: 4.7 ms against 5.6)."""
        if not (policy.compress_weight or policy.native_weights):
            return 0.0
        return self._unit_dense(unit, policy, kernel_decodes=decoding and not self.cuda) / self.profile.dequantize

    def _read_share(self, unit: Unit, by_token: bool, policy: Policy) -> float:
        """The share of a token table a unit reads: a vocabulary slice, or at most the rows of the
        tokens of one block's prompts (a block reads the rows its own tokens need)."""
        if not by_token:
            return 1.0
        if unit.vocab is not None:
            return (unit.vocab[1] - unit.vocab[0]) / self.model.vocab_size
        if unit.tokens:
            block = min(policy.block_size, self.workload.sequences)
            return min(1.0, block * self.workload.prompt_len / self.model.vocab_size)
        return 1.0

    def _vocab_slice(self, policy: Policy) -> int:
        """Logits columns materialised at once: the vocabulary, or one streamed slice of it."""
        unembed = units(self.model.layers, policy, self.dtype)[-1]
        return self.model.vocab_size if unembed.vocab is None else unembed.vocab[1] - unembed.vocab[0]

    def _weight_io(self, unit: Unit, policy: Policy, placed: dict[WeightKey, int] | None) -> dict[str, Term]:
        """Seconds a unit's weights take to arrive: linear in the weight fractions (the LP's view),
        or constants for the bytes `placed` puts on each tier."""
        p = self.profile
        io = {ch: Term() for ch in CHANNELS}
        if placed is None:
            nbytes = self._unit_stored(unit, policy)
            io["disk"] = term(w_disk=nbytes / p.disk_read)
            if self.cuda:
                io["h2d"] = term(w_cpu=nbytes / p.h2d, w_disk=nbytes / p.h2d)
            return io
        disk, cpu = (self._unit_stored(unit, policy, {k for k, t in placed.items() if t == tier}) for tier in (2, 1))
        io["disk"] = Term(disk / p.disk_read)
        if self.cuda:
            io["h2d"] = Term((cpu + disk) / p.h2d)
        return io

    def _unit_stored(self, unit: Unit, policy: Policy, keys: set[WeightKey] | None = None) -> float:
        """Bytes a unit reads of its weights (of those in `keys`, when given)."""
        total = 0.0
        for j in unit.layers:
            for name, param in self.model.layers[j].params.items():
                if keys is None or (j, name) in keys:
                    total += stored_nbytes(param, policy, self.dtype) * self._read_share(unit, param.by_token, policy)
        return total

    def _state_io(self, unit: Unit, kinds: list[str], policy: Policy, decoding: bool) -> dict[str, Term]:
        """Seconds the hidden states and KV cache of every micro-batch of the mean block take to
        move through a unit."""
        p, w, item = self.profile, self.workload, self.dtype.itemsize
        mean = lambda of: self.mean_block(policy, of)  # noqa: E731
        tokens = mean(lambda rows, width: rows * (1 if decoding else width))
        hidden = tokens * self.width * item  # one store and one fetch per micro-batch
        io = {ch: Term() for ch in CHANNELS}
        if kinds[0] != "embed" and kinds[-1] != "unembed":
            io["disk"] = term(act_disk=hidden / p.disk_write + hidden / p.disk_read)
            if self.cuda:
                io["h2d"] = term(act_cpu=hidden / p.h2d, act_disk=hidden / p.h2d)
                io["d2h"] = term(act_cpu=hidden / p.d2h, act_disk=hidden / p.d2h)
        if "attention" not in kinds or w.gen_len == 0:
            return io
        whole = mean(lambda rows, width: self._layer_cache(policy, rows, width))  # a block's, every micro-batch
        column = mean(lambda rows, width: self._layer_cache(policy, rows, width) / (width + w.gen_len))
        if not decoding:  # prefill writes the cache out
            io["disk"] = io["disk"] + term(cache_disk=whole / p.disk_write)
            if self.cuda:
                io["d2h"] = io["d2h"] + term(cache_cpu=whole / p.d2h, cache_disk=whole / p.d2h)
            return io
        # a write per (sequence, head) run of rows, keys and values, each dirtying a page that the
        # next direct read writes back
        calls = 2 * self.model.kv_heads * mean(lambda rows, width: rows)
        io["disk"] = io["disk"] + term(cache_disk=whole / p.disk_read + calls * (PAGE / p.disk_write + p.op_seconds))
        if self.cuda and policy.cpu_cache_compute:  # the new column goes down, the answer comes up
            io["d2h"] = io["d2h"] + term(cache_cpu=column / p.d2h, cache_disk=whole / p.d2h)
        elif self.cuda:
            io["h2d"] = io["h2d"] + term(cache_cpu=whole / p.h2d, cache_disk=whole / p.h2d)
            io["d2h"] = io["d2h"] + term(cache_cpu=column / p.d2h, cache_disk=column / p.d2h)
        return io


def _counted(placed: list[int]) -> tuple[float, ...]:
    """Each tier's share of equal units placed on these tiers."""
    return tuple(placed.count(t) / len(placed) for t in range(3))


def _signature(terms: dict[str, Term]) -> tuple[float, ...]:
    return tuple(x for t in terms.values() for x in (t.constant, *t.coefficients))


def _pooled(sizes: Sequence[float], in_flight: int) -> float:
    """Bytes a `BufferPool` ends up holding when units of these sizes pass through it in order,
    `in_flight` at a time, over two passes: it reuses a free buffer as `tiers.pool_pick` says,
    else allocates one, and never frees."""
    pool: list[int] = []
    free: list[int] = []
    held: list[int] = []
    for size in [*sizes, *sizes]:
        if len(held) == in_flight:
            free.append(held.pop(0))
        if size <= 0:
            held.append(0)
            continue
        capacity, taken = pool_pick(int(size), free)
        if taken is not None:
            held.append(free.pop(taken))
        else:
            pool.append(capacity)
            held.append(capacity)
    return float(sum(pool))
