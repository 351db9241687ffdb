"""The policy search: the fastest policy whose predicted memory fits the budgets (`policy=auto`).

FlexGen's search, on the engine's own cost model. The discrete choices — `gpu_batch_size`,
`num_gpu_batches`, overlap, a streamed unembedding, CPU attention (CUDA) — are enumerated;
for each, the placement fractions of weights, KV cache and activations solve a linear program
(scipy's HiGHS): minimise the workload's seconds, each unit's time bounded below by its compute
and by each channel's I/O, subject to every tier's peak bytes within its budget. The best few
programs are then predicted exactly (weights placed tensor by tensor, as `WeightStore` will
place them), and a policy whose exact peak would exceed a budget is solved again with that
budget tightened by the excess, so the search never returns one that does not fit. When nothing
fits, the error names the least raise of one budget that does, the others kept (`_infeasible`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linprog

from flexeval.engine.device import AUTO, resolve_device, resolve_dtype
from flexeval.engine.policy import Policy, TensorClass
from flexeval.errors import FlexevalError
from flexeval.models import registry
from flexeval.planning import hardware, timing
from flexeval.planning.cost_model import FRACTIONS, TIERS, CostModel, Prediction, Term, Workload

GB = 2**30
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NUM_BATCHES = (1, 2, 4, 8, 16, 32)
# a block's attention and MLP as separate units, or as one: one unit stages more weights at once,
# but with overlap its read no longer idles beside the short compute of a small layer (Qwen2.5-1.5B,
# bf16 weights streaming from disk, 32 rows: a decoding step 2.9 s apart, 2.3 s as one)
SEP = (True, False)
EXACT = 6  # programs predicted exactly, best first, until this many fit
ATTEMPTS = 24  # programs tried at most (a tight budget makes most overshoot once placed exactly)
RETRIES = 4  # re-solves with a budget tightened by what exact placement overshot
PREFERENCE = 1e-9  # seconds per unit fraction: between equally fast placements, keep tensors closer to compute
BUDGET_KEYS = {"compute": "gpu_mem_gb", "cpu": "cpu_mem_gb", "disk": "disk_gb"}


@dataclass(frozen=True)
class Budget:
    """Bytes each tier may hold (None: what the machine has). On a machine without CUDA the
    compute and CPU tiers are both RAM, so the engine's RAM stays within their sum."""

    compute: float | None = None
    cpu: float | None = None
    disk: float | None = None

    @classmethod
    def from_gb(
        cls,
        gpu_mem_gb: float | None,
        cpu_mem_gb: float | None,
        disk_gb: float | None,
        named: Callable[[str], str] = str,
    ) -> Budget:
        """Budgets in GB, each finite and positive, but a disk budget may be 0 (nothing on disk):
        the compute tier always holds working memory, and the process always needs some RAM.
        `named` spells a budget's name as the front door it came through does."""
        for key, value in zip(BUDGET_KEYS.values(), (gpu_mem_gb, cpu_mem_gb, disk_gb)):
            if value is None or (math.isfinite(value) and (value > 0 or (value == 0 and key == "disk_gb"))):
                continue
            least = (
                "finite and at least 0 (GB; 0 puts nothing on disk)" if key == "disk_gb" else "positive and finite (GB)"
            )
            raise FlexevalError(f"{named(key)} must be {least}, got {value:g}")
        return cls(*(None if v is None else float(v) * GB for v in (gpu_mem_gb, cpu_mem_gb, disk_gb)))

    def given(self) -> dict[str, float]:
        return {tier: value for tier in TIERS if (value := getattr(self, tier)) is not None}

    def scaled(self, factor: float) -> Budget:
        return Budget(*(None if (v := getattr(self, t)) is None else v * factor for t in TIERS))

    def describe(self, up: bool = False) -> str:
        """The given budgets in GB to three significant digits (`up`: rounded up, so that a budget
        named as feasible still is)."""
        shown = {t: _three_digits(v / GB, up) for t, v in self.given().items()}
        return ", ".join(f"{BUDGET_KEYS[t]}={v:.3g}" for t, v in shown.items()) or "no budgets"


@dataclass(frozen=True)
class Choice:
    policy: Policy
    prediction: Prediction

    def summary(self) -> str:
        p, predicted = self.policy, self.prediction
        percents = {kind: [max(0.0, round(100 * x, 1)) for x in p.split(kind)] for kind in TensorClass}
        shares = "  ".join(f"{kind} {'/'.join(f'{x:g}' for x in xs)}" for kind, xs in percents.items())
        peaks = ", ".join(f"{tier} {nbytes / GB:.3g} GB" for tier, nbytes in predicted.peak_bytes.items())
        return (
            f"gpu_batch_size={p.gpu_batch_size} num_gpu_batches={p.num_gpu_batches} overlap={p.overlap} "
            f"stream_unembedding={p.stream_unembedding} cpu_cache_compute={p.cpu_cache_compute} "
            f"sep_layer={p.sep_layer}; "
            f"compute/cpu/disk %: {shares}; predicted {predicted.tokens_per_second:.1f} tokens/s, peaks {peaks}"
        )


@dataclass(frozen=True)
class Shape:
    """The discrete part of a policy, which the linear program does not choose."""

    gpu_batch_size: int
    num_gpu_batches: int
    overlap: bool
    stream_unembedding: bool
    cpu_cache_compute: bool
    sep_layer: bool = True


# One sequence at a time through a streamed unembedding: the least memory a workload can take.
LEANEST = (Shape(1, 1, False, True, False), Shape(1, 1, True, True, False))


def search(costs: CostModel, base: Policy, budget: Budget) -> Choice:
    """The fastest policy for `costs`' workload within `budget`; `base` gives everything the search
    does not choose (compression, attention sparsity, pinning). Raises a FlexevalError naming
    the least raise of the budgets that would do, when none fits."""
    limits = _limits(costs, budget)
    solved = []
    for shape in _shapes(costs):
        policy = _policy(base, shape, costs.workload)
        program = _solve(costs, policy, limits)
        if program is not None:
            solved.append((program[0], policy, program[1]))
    # the best programs, then the leanest shapes: whatever `_fits` finds, the search finds too
    ranked = [(policy, x) for _, policy, x in sorted(solved, key=lambda s: s[0])[:ATTEMPTS]]
    ranked += [(p, None) for p in (_policy(base, shape, costs.workload) for shape in LEANEST) if p not in dict(ranked)]
    best: Choice | None = None
    found = 0
    for policy, fractions in ranked:
        choice = _exact(costs, policy, limits, fractions)
        if choice is not None and (best is None or choice.prediction.seconds < best.prediction.seconds):
            best = choice
        found += choice is not None
        if found == EXACT:
            break
    if best is None:  # the leanest shapes with everything they can put on disk, as `_fits` tries them
        best = next(filter(None, (_on_disk(costs, base, shape, limits) for shape in LEANEST)), None)
    if best is None:  # what `_infeasible` names is found here once its budget is given
        leanest = (_least(costs, base, shape, limits, tier) for tier in TIERS for shape in LEANEST)
        best = next((c for c in leanest if c is not None and not _over(costs, c.prediction, limits)), None)
    if best is None:
        raise FlexevalError(_infeasible(costs, base, budget))
    return best


def _limits(costs: CostModel, budget: Budget) -> dict[str, float]:
    memory = costs.profile.memory
    return {tier: getattr(budget, tier) if getattr(budget, tier) is not None else float(memory[tier]) for tier in TIERS}


def _shapes(costs: CostModel) -> list[Shape]:
    """Batch shapes worth trying: blocks no larger than the workload needs."""
    sequences = costs.workload.sequences
    cuda = costs.cuda
    shapes = []
    for b, k in itertools.product(BATCH_SIZES, NUM_BATCHES):
        if b * k >= 2 * sequences and not (k == 1 and b < 2 * sequences):
            continue
        for overlap, stream, delegate, sep in itertools.product((True, False), (False, True), (False, True), SEP):
            if delegate and not (cuda and costs.workload.gen_len > 1):
                continue
            if not (sep or overlap):  # without overlap a block's two layers cost what they cost apart
                continue
            shapes.append(Shape(b, k, overlap, stream, delegate, sep))
    return shapes


def _policy(base: Policy, shape: Shape, workload: Workload, fractions: np.ndarray | None = None) -> Policy:
    """A policy of this shape placing `fractions`, whose micro-batches hold no more tokens than
    the workload's were planned with (`Policy.gpu_batch_tokens`)."""
    fields = dict(
        gpu_batch_size=shape.gpu_batch_size,
        gpu_batch_tokens=shape.gpu_batch_size * (workload.prompt_len + workload.gen_len),
        num_gpu_batches=shape.num_gpu_batches,
        overlap=shape.overlap,
        stream_unembedding=shape.stream_unembedding,
        cpu_cache_compute=shape.cpu_cache_compute,
        sep_layer=shape.sep_layer,
    )
    x = np.zeros(len(FRACTIONS)) if fractions is None else fractions
    for kind in TensorClass:
        cpu = round(100 * float(x[FRACTIONS.index(f"{kind}_cpu")]), 1)
        disk = round(100 * float(x[FRACTIONS.index(f"{kind}_disk")]), 1)
        cpu, disk = min(max(0.0, cpu), 100.0), min(max(0.0, disk), 100.0)  # 0.0 first: never -0.0
        disk = min(disk, 100.0 - cpu)
        fields |= {f"{kind}_cpu_percent": cpu, f"{kind}_gpu_percent": round(100.0 - cpu - disk, 1)}
    return replace(base, **fields)


def _solve(costs: CostModel, policy: Policy, limits: dict[str, float]) -> tuple[float, np.ndarray] | None:
    """The linear program for one shape: (predicted seconds, fractions), or None if infeasible."""
    n = len(FRACTIONS)
    blocks = costs.blocks(policy)
    rows: list[np.ndarray] = []
    bounds: list[float] = []
    objective: list[float] = []

    def at_most(t: Term, limit: float, epigraph: int | None = None) -> None:
        """t(x) - x[epigraph] <= limit (the epigraph variable absent when None)."""
        row = np.zeros(n + len(objective))
        row[:n] = t.coefficients
        if epigraph is not None:
            row[epigraph] = -1.0
        rows.append(row)
        bounds.append(limit - t.constant)

    for stage in costs.stages(policy):
        for cost in stage.units:
            objective.append(stage.passes * blocks * cost.count)
            for bound in costs.bounds(cost, policy):
                at_most(bound, 0.0, n + len(objective) - 1)
    for term, limit in _memory(costs, policy, limits):
        at_most(term, limit)
    width = n + len(objective)
    a_ub = np.array([np.pad(r, (0, width - len(r))) for r in rows])
    c = np.concatenate([_preference(), objective])
    variable_bounds = _fraction_bounds(costs) + [(0.0, None)] * len(objective)
    result = linprog(c, A_ub=a_ub, b_ub=np.array(bounds), bounds=variable_bounds, method="highs")
    if result.status != 0:
        return None
    return float(result.fun), result.x[:n]


def _memory(
    costs: CostModel, policy: Policy, limits: dict[str, float], free: str | None = None
) -> list[tuple[Term, float]]:
    """The program's memory constraints (term <= limit): every tier but `free` within its limit,
    both RAM tiers together within the machine's RAM on a CPU, each tensor class's shares at most 1."""
    weights, peaks = costs.weight_terms(policy), costs.peaks(policy)
    constraints = [(weights[t] + peaks[t], limits[t]) for t in TIERS if t != free]
    if not costs.cuda:  # both tiers are RAM: together within what the machine has
        ram = weights["compute"] + peaks["compute"] + weights["cpu"] + peaks["cpu"]
        constraints.append((ram, float(costs.profile.memory["cpu"])))
    return constraints + [(_pair(kind), 1.0) for kind in TensorClass]


def _preference() -> np.ndarray:
    return np.array([PREFERENCE * (1 + f.endswith("disk")) for f in FRACTIONS])


def _fraction_bounds(costs: CostModel) -> list[tuple[float, float | None]]:
    return [(0.0, 0.0 if _unused(costs, f) else 1.0) for f in FRACTIONS]


def _pair(kind: TensorClass) -> Term:
    vector = np.zeros(len(FRACTIONS))
    vector[FRACTIONS.index(f"{kind}_cpu")] = vector[FRACTIONS.index(f"{kind}_disk")] = 1.0
    return Term(0.0, vector)


def _unused(costs: CostModel, fraction: str) -> bool:
    """Fractions with nothing to place: the KV cache of a score-only workload."""
    return fraction.startswith("cache") and costs.workload.gen_len == 0


def _exact(
    costs: CostModel, shaped: Policy, limits: dict[str, float], fractions: np.ndarray | None = None
) -> Choice | None:
    """Solve (unless the program's `fractions` at these limits are given), place exactly, and
    re-solve with tightened budgets while the exact peak overshoots."""
    tightened = dict(limits)
    for _ in range(RETRIES):
        if fractions is None:
            program = _solve(costs, shaped, tightened)
            if program is None:
                return None
            fractions = program[1]
        policy = _policy(shaped, _shape(shaped), costs.workload, fractions)
        fractions = None
        prediction = costs.predict(policy)
        over = _over(costs, prediction, limits)
        if not over:
            return Choice(policy, prediction)
        if not _tighten(tightened, over):
            return None
    return None


def _over(
    costs: CostModel, prediction: Prediction, limits: dict[str, float], free: str | None = None
) -> dict[str, float]:
    """Bytes by which an exact placement overshoots each tier's limit but `free`'s, the machine's
    RAM on a CPU counted against the RAM tier that is not `free` (compute unless it is)."""
    peaks = prediction.peak_bytes
    over = {t: peaks[t] - limits[t] for t in TIERS if t != free and peaks[t] > limits[t]}
    ram = peaks["compute"] + peaks["cpu"] - costs.profile.memory["cpu"]
    if not costs.cuda and ram > 0:
        cut = "cpu" if free == "compute" else "compute"
        over[cut] = max(over.get(cut, 0.0), ram)
    return over


def _tighten(limits: dict[str, float], over: dict[str, float]) -> bool:
    """Limits lowered by what an exact placement overshot (and a margin), for the program to be
    solved again; False when one would reach zero."""
    for tier, excess in over.items():
        limits[tier] -= 1.05 * excess
        if limits[tier] <= 0:
            return False
    return True


def _shape(policy: Policy) -> Shape:
    return Shape(
        policy.gpu_batch_size,
        policy.num_gpu_batches,
        policy.overlap,
        policy.stream_unembedding,
        policy.cpu_cache_compute,
        policy.sep_layer,
    )


def _infeasible(costs: CostModel, base: Policy, budget: Budget) -> str:
    """The error for a budget nothing fits: it names the least raise that surely fits. Each given
    budget alone is raised to what `_least` needs on its tier, the others kept, and the smallest
    raise relative to its budget is named, the others after it; when no budget alone will do,
    each is raised to what the leanest policy with everything on disk needs. The search tries
    both policies last, so it finds one within the budget named."""
    given = budget.given()
    what = f"{costs.model.family} model, {costs.workload.prompt_len}-token prompts"
    if not given:
        return f"no policy fits this machine's memory for the {what}"
    limits = _limits(costs, budget)
    alone = {}
    for tier in given:
        needs = [c.prediction.peak_bytes[tier] for s in LEANEST if (c := _least(costs, base, s, limits, tier))]
        if needs:
            alone[tier] = min(needs)
    raises = sorted(alone, key=lambda t: _ratio(alone[t], given[t]))
    notes = []
    if raises:
        least = replace(budget, **{raises[0]: alone[raises[0]]})
        if raises[1:]:
            each = (f"{BUDGET_KEYS[t]} to {_three_digits(alone[t] / GB, up=True):.3g}" for t in raises[1:])
            notes.append(f"or raise {', or '.join(each)} instead")
    else:
        least = _all_raised(costs, base, budget)
        if least is None:
            return f"no policy fits {budget.describe()} for the {what}, nor any larger budget of those tiers"
    if len(given) < len(TIERS):
        notes.append("or put more of the model on a tier without a budget")
    note = f" ({'; '.join(notes)})" if notes else ""
    feasible = least.describe(up=True)
    return f"no policy fits {budget.describe()} for the {what}: the smallest feasible budget is {feasible}{note}"


def _all_raised(costs: CostModel, base: Policy, budget: Budget) -> Budget | None:
    """Every given budget raised to what a leanest shape needs with everything on disk (the one
    needing the least raise relative to the budgets), if that fits the machine."""
    given = budget.given()
    raised = []
    for shape in LEANEST:
        peaks = costs.predict(_all_on_disk(costs, base, shape)).peak_bytes
        least = replace(budget, **{t: max(v, peaks[t]) for t, v in given.items()})
        if _on_disk(costs, base, shape, _limits(costs, least)) is not None:
            raised.append(least)
    return min(raised, key=lambda b: sum(_ratio(getattr(b, t), v) for t, v in given.items()), default=None)


def _ratio(raised: float, given: float) -> float:
    """How many times a budget a raise is (a zero budget's raise is the dearest)."""
    return raised / given if given else math.inf


def _least(costs: CostModel, base: Policy, shape: Shape, limits: dict[str, float], tier: str) -> Choice | None:
    """The policy of this shape that puts the fewest bytes on `tier` while every other tier stays
    within its limit, placed exactly (a limit the placement overshoots is tightened and the
    program solved again), or None; its peak on `tier` is whatever that takes. `tier`'s own limit
    plays no part, so raising it to that peak leaves this policy the same, and then it fits."""
    shaped = _policy(base, shape, costs.workload)
    tightened = dict(limits)
    for _ in range(RETRIES):
        constraints = _memory(costs, shaped, tightened, free=tier)
        usage = costs.weight_terms(shaped)[tier] + costs.peaks(shaped)[tier]
        result = linprog(
            usage.coefficients + _preference(),
            A_ub=np.array([term.coefficients for term, _ in constraints]),
            b_ub=np.array([limit - term.constant for term, limit in constraints]),
            bounds=_fraction_bounds(costs),
            method="highs",
        )
        if result.status != 0:
            return None
        policy = _policy(shaped, shape, costs.workload, result.x)
        prediction = costs.predict(policy)
        over = _over(costs, prediction, limits, free=tier)
        if not over:
            return Choice(policy, prediction)
        if not _tighten(tightened, over):
            return None
    return None


def _on_disk(costs: CostModel, base: Policy, shape: Shape, limits: dict[str, float]) -> Choice | None:
    """The policy of this shape with every tensor class on disk, if it fits."""
    policy = _all_on_disk(costs, base, shape)
    prediction = costs.predict(policy)
    return None if _over(costs, prediction, limits) else Choice(policy, prediction)


def _all_on_disk(costs: CostModel, base: Policy, shape: Shape) -> Policy:
    return _policy(base, shape, costs.workload, np.array([float(f.endswith("disk")) for f in FRACTIONS]))


def plan(
    spec: str | Path,
    workload: Workload,
    budget: Budget,
    *,
    base: Policy | None = None,
    dtype: str | torch.dtype = AUTO,
    device: str | torch.device | None = None,
    offload_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    profile_overrides: Mapping[str, Any] | None = None,
) -> Choice:
    """`search` for a model spec on this machine (see `cost_model`).

    A RAM budget on a CPU is a promise about this process's peak, which glibc's heaps would
    overshoot (`engine.heap`), so the policy chosen for one bounds them."""
    costs = cost_model(spec, workload, dtype, device, offload_dir, cache_dir, profile_overrides)
    base = base or Policy()
    if not costs.cuda and (budget.compute is not None or budget.cpu is not None):
        base = replace(base, bound_heap=True)
    return search(costs, base, budget)


def cost_model(
    spec: str | Path,
    workload: Workload,
    dtype: str | torch.dtype = AUTO,
    device: str | torch.device | None = None,
    offload_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    profile_overrides: Mapping[str, Any] | None = None,
) -> CostModel:
    """The cost model of a model spec on this machine: its shapes from its config (no weights are
    read), this machine's profile (measured on first use, then cached) and its layers' times."""
    device = resolve_device(device)
    directory = registry.resolve(str(spec), cache_dir)
    dtype = resolve_dtype(dtype, device, directory)
    model = registry.build_model(directory)
    cache = registry.cache_root(cache_dir)
    offload = cache / "offload" if offload_dir is None else Path(offload_dir).expanduser()
    offload.mkdir(parents=True, exist_ok=True)
    machine = hardware.profile(device, offload, cache, profile_overrides)
    layers = timing.layer_times(model, dtype, device, offload, cache)
    return CostModel(model, dtype, machine, layers, workload)


def _three_digits(value: float, up: bool) -> float:
    if not up or value <= 0:
        return value
    step = 10 ** (math.floor(math.log10(value)) - 2)
    return math.ceil(value / step - 1e-9) * step
