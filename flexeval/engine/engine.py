"""`Engine`: a loaded model that scores and generates token sequences through the block schedule.

The engine sorts sequences by length, cuts them into blocks of `gpu_batch_size ×
num_gpu_batches` and each block into micro-batches, and runs each block through the schedule,
which streams every layer's weights from their tiers once per block. It owns the padding, the
masks, the KV cache and the readout of the head (log-probabilities of given tokens, or the next
token), so models stay pure layer math and the schedule stays one loop.

Each call's sort and cut is the only one: its `Stream` names every block's requests before any
runs, and hands over each block's results and stats (`BlockResults`) as the block ends, so that a
caller records them at once; `score`, `generate` and the other list methods collect a stream.
"""

from __future__ import annotations

import resource
import shutil
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from flexeval import ownership
from flexeval.engine.batch import (
    Packed,
    PaddedBatch,
    TokenSeq,
    as_token_ids,
    as_token_lists,
    cut_blocks,
    is_int,
    left_pad,
    pack,
    packed_mask,
)
from flexeval.engine.device import AUTO, resolve_device, resolve_dtype
from flexeval.engine.finite import Inspection, WeightCheck
from flexeval.engine.generation import Decoding, Sampling
from flexeval.engine.heap import Heap, map_large_buffers, release_free_memory, reuse_compute_buffers
from flexeval.engine.kv_cache import QuantizedKVCache
from flexeval.engine.placement import BlockState, WeightStore, native, weight_bytes_per_tier
from flexeval.engine.policy import Policy, TensorClass
from flexeval.engine.readout import ForcedReadout, ScoreReadout, StreamedScoreReadout, TokenReadout
from flexeval.engine.schedule import CacheMode, Executors, Timing, Unit, run_pass, units
from flexeval.engine.tiers import DiskTier, MemoryTier, Tier
from flexeval.errors import FlexevalError
from flexeval.models import registry
from flexeval.models.checkpoint import Source, iter_weights, open_checkpoint
from flexeval.models.common import Cache, KVCache, Model, Readout, Step, StoredValues
from flexeval.quantization import int4mm
from flexeval.quantization.calibration import Calibration
from flexeval.quantization.gptq import FittedWeights
from flexeval.reproducible import safe_gemm_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TENSOR_CLASSES = ("weights", "cache", "act")
R = TypeVar("R")
S = TypeVar("S")
Pair = tuple[Tensor, list[Tensor]]  # a context's tokens and its continuations'


@dataclass(frozen=True)
class Scored:
    """One continuation's log-likelihood given its context, and whether greedy decoding produces it."""

    logprob: float
    greedy: bool


@dataclass
class RunStats:
    """What one `logprobs` or `generate` call did: throughput, I/O against compute, bytes per tier."""

    sequences: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compute_seconds: float = 0.0
    io_wait_seconds: float = 0.0  # compute thread idle, waiting for weights or state
    tiers: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # class -> tier -> figures
    peak_rss_bytes: int = 0  # of the whole process so far

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def __add__(self, other: RunStats) -> RunStats:
        """Two blocks' figures as one call's: counts, bytes and times add up, peaks are the larger."""
        tiers: dict[str, dict[str, dict[str, float]]] = {}
        for name in {**self.tiers, **other.tiers}:
            ours, theirs = self.tiers.get(name, {}), other.tiers.get(name, {})
            tiers[name] = {tier: _add_figures(ours.get(tier, {}), theirs.get(tier, {})) for tier in {**ours, **theirs}}
        return RunStats(
            sequences=self.sequences + other.sequences,
            prefill_tokens=self.prefill_tokens + other.prefill_tokens,
            decode_tokens=self.decode_tokens + other.decode_tokens,
            prefill_seconds=self.prefill_seconds + other.prefill_seconds,
            decode_seconds=self.decode_seconds + other.decode_seconds,
            compute_seconds=self.compute_seconds + other.compute_seconds,
            io_wait_seconds=self.io_wait_seconds + other.io_wait_seconds,
            tiers=tiers,
            peak_rss_bytes=max(self.peak_rss_bytes, other.peak_rss_bytes),
        )


def _add_figures(ours: Mapping[str, float], theirs: Mapping[str, float]) -> dict[str, float]:
    """A tier's figures over two blocks: a peak is the larger one, anything else the sum."""
    return {
        key: max(ours.get(key, 0), theirs.get(key, 0))
        if key.startswith("peak")
        else ours.get(key, 0) + theirs.get(key, 0)
        for key in {**ours, **theirs}
    }


@dataclass(frozen=True)
class DecodeCall:
    """What a call that decodes asks for: generation, or continuations forced through decoding
    steps. `readout(micro_batch, t)` says what becomes of the logits predicting each sequence's
    t-th new token, and which tokens are fed on."""

    seqs: list[Tensor]
    budgets: Tensor  # new tokens per sequence, at most
    readout: Callable[[list[int], int], Readout]
    stops: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # token ids that end a sequence
    stopped: Callable[[list[int]], bool] | None = None  # whether a sequence's new tokens end it (stop strings)


@dataclass(frozen=True)
class BlockResults(Generic[R]):
    """What one block finished, handed over as soon as it ends: a caller records its results at
    once (a killed run resumes after them) and counts the block's cost beside them, with no
    engine state to read back afterwards."""

    indices: tuple[int, ...]  # into the call's list of requests
    results: tuple[R, ...]  # one per index
    stats: RunStats  # this block's alone


class Stream(Generic[R]):
    """One call's blocks, run as they are iterated. `blocks` says which requests each block will
    finish before any runs, so that a progress bar can size a block while it runs; `stats` sums
    the blocks handed over so far."""

    def __init__(self, size: int, blocks: Sequence[tuple[int, ...]], run: Iterator[BlockResults[R]]) -> None:
        self.size, self.blocks, self._run = size, list(blocks), run
        self.stats = RunStats()

    def __iter__(self) -> Iterator[BlockResults[R]]:
        for block in self._run:
            self.stats = self.stats + block.stats
            yield block

    def collect(self) -> list[R]:
        """Every block run, the results in the caller's order."""
        results: dict[int, R] = {}
        for block in self:
            results.update(zip(block.indices, block.results))
        return [results[i] for i in range(self.size)]

    def map(self, change: Callable[[BlockResults[R]], Sequence[S]]) -> Stream[S]:
        """The same blocks, each one's results changed as it is handed over (before the next runs)."""

        def run() -> Iterator[BlockResults[S]]:
            for block in self:
                yield BlockResults(block.indices, tuple(change(block)), block.stats)

        return Stream(self.size, self.blocks, run())

    def grouped(self, owners: Sequence[int], size: int, combine: Callable[[list[R]], S]) -> Stream[S]:
        """The items gathered into the `size` requests that own them (`owners[item]`, in item
        order): a request is handed over with the block that finishes its last item."""
        items: dict[int, list[int]] = {}
        for item, owner in enumerate(owners):
            items.setdefault(owner, []).append(item)
        finished_in = {item: b for b, block in enumerate(self.blocks) for item in block}
        last = {owner: max(finished_in[i] for i in its) for owner, its in items.items()}
        blocks = [tuple(owner for owner in sorted(last) if last[owner] == b) for b in range(len(self.blocks))]

        def run() -> Iterator[BlockResults[S]]:
            done: dict[int, R] = {}
            for block, owners_done in zip(self, blocks):
                done.update(zip(block.indices, block.results))
                results = tuple(combine([done.pop(i) for i in items[owner]]) for owner in owners_done)
                yield BlockResults(owners_done, results, block.stats)

        return Stream(size, blocks, run())


def _make_tiers(
    name: str, device: torch.device, policy: Policy, workdir: Path | None, durable: bool
) -> tuple[Tier, Tier, Tier | None]:
    pin = policy.pin_weight if name == "weights" else True
    cpu_device = torch.device("cpu") if name == "cache" and policy.cpu_cache_compute else device
    disk = DiskTier(workdir / name, device, pin=pin, durable=durable) if workdir is not None else None
    if disk is not None:
        disk.directory.mkdir()
    return (
        MemoryTier("compute", device, home=device),
        MemoryTier("cpu", cpu_device, home=torch.device("cpu"), pin=pin),
        disk,
    )


def _prepare_offload_dir(offload_dir: str | Path | None, needed: int) -> Path:
    """A folder of this engine's own in the offload directory, with room for the weights' disk
    share. Folders that killed runs left there are reclaimed first (`flexeval.ownership`), so that
    they neither fill the disk nor make this run refuse for lack of space. The KV cache's and the
    activations' disk shares depend on the batch, unknown here: each block checks them as it
    places them (`BlockState`)."""
    root = registry.cache_root() / "offload" if offload_dir is None else Path(offload_dir).expanduser()
    if offload_dir is None:
        root.mkdir(parents=True, exist_ok=True)
    if not root.is_dir():
        raise FlexevalError(f"offload directory {root} does not exist: create it or pass another offload_dir")
    folders = "flexeval-*"
    ownership.reclaim(root, folders, "offload folder")
    try:
        workdir = ownership.owned_directory(root, "flexeval-")
    except OSError as err:
        raise FlexevalError(
            f"offload directory {root} is not writable ({err.strerror}): pass another offload_dir"
        ) from err
    free = shutil.disk_usage(workdir).free
    if free < needed:
        ownership.remove(workdir)
        left = ownership.leftovers(root, folders, besides=workdir)
        others = ""
        if left.directories:
            held = "folder there holds" if left.directories == 1 else "folders there hold"
            others = (
                f" ({left.directories} other flexeval-* {held} {left.bytes / 2**30:.2f} GiB: "
                "delete those no running flexeval uses)"
            )
        raise FlexevalError(
            f"offload directory {root} has {free / 2**30:.2f} GiB free but the policy puts "
            f"{needed / 2**30:.2f} GiB of weights there{others}: free space or lower the disk share"
        )
    return workdir


def product_shapes(model: Model, plan: Sequence[Unit]) -> set[tuple[int, int]]:
    """(in, out) features of the matrix products the model computes: every 2-D weight (lookup
    tables too: a shape probed needlessly costs milliseconds), and the unembedding's vocabulary
    slices when it streams."""
    shapes = {(p.shape[1], p.shape[0]) for layer in model.layers for p in layer.params.values() if len(p.shape) == 2}
    for unit in plan:
        if unit.vocab is not None:
            (table,) = model.layers[unit.layers[0]].params.values()
            shapes.add((table.shape[1], unit.vocab[1] - unit.vocab[0]))
    return shapes


class Engine:
    """A model whose weights, KV cache and activations live where a `Policy` says."""

    def __init__(
        self,
        model: Model,
        weights: WeightStore,
        tiers: dict[str, tuple[Tier, Tier, Tier | None]],
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        dtype: torch.dtype,
        policy: Policy,
        workdir: Path | None = None,
        gemm_rows: int = 1,
    ) -> None:
        self.model = model
        self.weights = weights
        self.tiers = tiers
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.policy = policy
        self.plan = units(model.layers, policy, dtype)
        self.gemm_rows = gemm_rows  # matrix products of fewer rows are padded (flexeval.reproducible)
        self.score_readout = StreamedScoreReadout if policy.stream_unembedding else ScoreReadout
        self.io = Executors.make(policy.overlap)
        self.heap = Heap() if policy.bound_heap else None  # trimmed as it grows, under a RAM budget
        self._latest: Stream | None = None  # the latest call's, whose stats `stats` reads
        # told after each unit (layer, or attention and MLP) of every pass, with the pass's share
        # done: what a progress bar needs to move within a block
        self.on_unit: Callable[[float], None] | None = None
        self._finalizer = weakref.finalize(self, _cleanup, self.io, workdir)

    @classmethod
    def load(
        cls,
        spec: str | Path = registry.DEFAULT_MODEL,
        *,
        dtype: str | torch.dtype = AUTO,
        device: str | torch.device | None = None,
        cache_dir: str | Path | None = None,
        policy: Policy | None = None,
        offload_dir: str | Path | None = None,
        calibration: Calibration | None = None,
    ) -> Engine:
        """Load a model spec (a registered name, a checkpoint directory or a hub id) under a policy.
        `calibration` is the text that a GPTQ fit of the weights (`fit="gptq"`) is fitted to.

        Everything that can be wrong with the request is checked before weights are read.
        """
        policy = policy or Policy()
        if policy.bound_heap:
            map_large_buffers()  # before loading, which streams the weights through buffers
        device = resolve_device(device)
        if dtype != AUTO:
            resolve_dtype(dtype, device)  # a bad name is refused before the checkpoint is prepared
        directory = registry.resolve(str(spec), cache_dir)
        dtype = resolve_dtype(dtype, device, directory)
        if policy.compress_weight and policy.comp_weight_config.tiled and dtype != int4mm.DTYPE:
            raise FlexevalError(
                f"compression kernel int4mm multiplies in bfloat16 (torch's int4 CPU kernel) but the model runs "
                f"in {dtype}: set dtype=bfloat16, or use compression=4bit-weights-input (the same codes, dequantized)"
            )
        model = registry.build_model(directory)
        shapes = product_shapes(model, units(model.layers, policy, dtype))
        gemm_rows = safe_gemm_rows(shapes, dtype, device, registry.cache_root(cache_dir))
        tokenizer = registry.load_tokenizer(directory)
        _check_native(spec, model, policy)
        checkpoint = open_checkpoint(directory)
        uses_disk = any(policy.split(kind)[2] > 0 for kind in TensorClass)
        on_disk = weight_bytes_per_tier(model.layers, policy, dtype)[2]
        fitted = None
        if policy.compress_weight and policy.comp_weight_config.fit == "gptq":
            fitted = _gptq_fit(spec, model, directory, policy, dtype, device, calibration, tokenizer, cache_dir)
        workdir = _prepare_offload_dir(offload_dir, on_disk) if uses_disk else None
        tiers, store = _store_weights(spec, model, checkpoint, policy, dtype, device, workdir, fitted)
        release_free_memory()
        if policy.bound_heap:
            reuse_compute_buffers()
        return cls(model, store, tiers, tokenizer, device, dtype, policy, workdir, gemm_rows)

    def close(self) -> None:
        """Stop the I/O threads and delete this engine's offload files (also done on garbage
        collection). Closing again does nothing; any other call on a closed engine is refused."""
        self._finalizer()

    def _check_open(self) -> None:
        """A closed engine has no I/O threads nor offload files: a resident one could still
        compute, but refusing alike is what makes a use after `close` a bug found at once."""
        if not self._finalizer.alive:
            raise FlexevalError("this engine is closed: load it again")

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def stats(self) -> RunStats:
        """What the latest call's blocks did so far, summed: for callers of the list-returning
        methods. A stream's consumer reads each block's own `stats` as the block ends."""
        return self._latest.stats if self._latest is not None else RunStats()

    def _started(self, stream: Stream[R]) -> Stream[R]:
        """The call's stream, whose stats `stats` reads."""
        self._latest = stream
        return stream

    def logprobs(self, sequences: Sequence[TokenSeq]) -> list[Tensor]:
        """lp[i][t] = log p(sequences[i][t + 1] | sequences[i][: t + 1]), as float32 on the CPU."""
        self._check_open()
        seqs = as_token_lists(sequences, self.model.vocab_size, "logprobs")
        # the last token is only ever a target, so the model reads each sequence but its last token
        self._check_positions([len(s) - 1 for s in seqs], "logprobs")
        rows = {i: pack(s[:1], [s[1:]]) for i, s in enumerate(seqs) if len(s) > 1}
        unread = {i: (torch.empty(0), torch.empty(0)) for i in range(len(seqs)) if i not in rows}
        return [logprobs for logprobs, _ in self._started(self._score_stream(rows, len(seqs), unread)).collect()]

    def score(self, requests: Sequence[tuple[TokenSeq, Sequence[TokenSeq]]]) -> list[list[Scored]]:
        """`score_blocks`' results, every block run, in the requests' order."""
        return self.score_blocks(requests).collect()

    def score_blocks(self, requests: Sequence[tuple[TokenSeq, Sequence[TokenSeq]]]) -> Stream[list[Scored]]:
        """For each (context, continuations): every continuation's log-likelihood given the context,
        and whether greedy decoding would produce it, handed over a block at a time. A request's
        context is computed once for all of its continuations (a multiple-choice document's endings
        share one sequence). The requests are checked now; iterating the stream runs the blocks."""
        self._check_open()
        rows = {i: pack(context, continuations) for i, (context, continuations) in enumerate(self._pairs(requests))}
        self._check_positions([int(r.positions.max()) + 1 for r in rows.values()], "score")

        def scored(block: BlockResults[tuple[Tensor, Tensor]]) -> list[list[Scored]]:
            found = []
            for i, (logprobs, greedy) in zip(block.indices, block.results):
                spans = zip(logprobs.split(rows[i].spans), greedy.split(rows[i].spans))
                found.append([Scored(float(lp.sum()), bool(g.all())) for lp, g in spans])
            return found

        return self._started(self._score_stream(rows, len(rows)).map(scored))

    def _pairs(self, requests: Sequence[tuple[TokenSeq, Sequence[TokenSeq]]], what: str = "score") -> list[Pair]:
        """(context, continuations) requests as token tensors, checked alike by every scoring entry
        point, so that a bad request is refused, by its number, before any block runs."""
        if not isinstance(requests, Sequence) or not requests:
            raise FlexevalError(f"{what} takes a non-empty list of (context, continuations) pairs")
        vocab, pairs = self.model.vocab_size, []
        for i, request in enumerate(requests):
            if not (isinstance(request, Sequence) and len(request) == 2 and request[1]):
                raise FlexevalError(f"{what}: request {i} is not a (context, [continuation, ...]) pair")
            context = as_token_ids(request[0], vocab, f"{what}: request {i}'s context")
            pairs.append((context, as_token_lists(request[1], vocab, f"{what}: request {i}'s continuations")))
        return pairs

    def _score_stream(
        self, rows: dict[int, Packed], size: int, unread: Mapping[int, tuple[Tensor, Tensor]] | None = None
    ) -> Stream[tuple[Tensor, Tensor]]:
        """Every row's (log-probability, greedy) per target, a block at a time."""
        blocks = self._cut({i: len(row) for i, row in rows.items()})
        return _stream(size, blocks, self._run_scores(rows, blocks), unread or {})

    @torch.inference_mode()
    def _run_scores(
        self, rows: dict[int, Packed], blocks: list[list[list[int]]]
    ) -> Iterator[BlockResults[tuple[Tensor, Tensor]]]:
        for block in blocks:
            timing, start = self._begin()
            steps = [self._packed_step([rows[i] for i in mb]) for mb in block]
            with self._block_state(len(block)) as state:
                outputs = self._pass(state, steps, timing)
            found: dict[int, tuple[Tensor, Tensor]] = {}
            for mb, step, out in zip(block, steps, outputs):
                counts = [len(rows[i].targets) for i in mb]
                found.update(zip(mb, zip(out.cpu().split(counts), step.readout.greedy().cpu().split(counts))))
            tokens = sum(len(rows[i]) for i in found)
            stats = RunStats(sequences=len(found), prefill_tokens=tokens, prefill_seconds=time.perf_counter() - start)
            yield BlockResults(tuple(found), tuple(found.values()), self._end(timing, stats))

    def generate(
        self, prompts: Sequence[TokenSeq], max_new_tokens: int | Sequence[int] = 32, **settings: Any
    ) -> list[list[int]]:
        """`generate_blocks`' new tokens, every block run, in the prompts' order."""
        return self.generate_blocks(prompts, max_new_tokens, **settings).collect()

    def generate_blocks(
        self,
        prompts: Sequence[TokenSeq],
        max_new_tokens: int | Sequence[int] = 32,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
    ) -> Stream[list[int]]:
        """New token ids for each prompt, handed over a block at a time: greedy unless temperature > 0.

        A sequence ends after `max_new_tokens` (one number, or one per prompt), with a stop
        token (default: the tokenizer's end-of-sequence), or once its decoded text contains one
        of `stop_strings`; the stopping token is included in its output. A block stops as soon
        as all of its sequences have. The arguments are checked now; iterating runs the blocks.
        """
        self._check_open()
        seqs = as_token_lists(prompts, self.model.vocab_size, "generate")
        budgets = self._budgets(max_new_tokens, len(seqs))
        sampling = Sampling(temperature, top_k, top_p, seed)
        # the last new token is only returned, never fed back, so it needs no position
        self._check_positions([len(s) + max(n - 1, 0) for s, n in zip(seqs, budgets)], "generate")
        stops = torch.tensor(self._stop_ids(stop_token_ids), dtype=torch.long)
        stopped = self._text_stop(stop_strings)
        generator = None if sampling.greedy else torch.Generator(self.device).manual_seed(seed)

        def readout(mb: list[int], t: int) -> Readout:
            return TokenReadout(len(mb), self.model.vocab_size, sampling, generator, self.device)

        return self._started(self._decode(DecodeCall(seqs, torch.tensor(budgets), readout, stops, stopped)))

    def decode_logprobs(self, prompts: Sequence[TokenSeq], continuations: Sequence[TokenSeq]) -> list[Tensor]:
        """log p of each continuation token given the prompt and the tokens before it, computed as
        generation computes it: the prompt prefilled, then one decoding step per token against the
        KV cache (compressed, or read sparsely, as the policy says). `logprobs` scores a whole
        sequence in one exact pass; this measures what the cache's approximations cost."""
        self._check_open()
        stream = self._started(self._decode_scored(prompts, continuations, "decode_logprobs"))
        return [logprob for logprob, _ in stream.collect()]

    def decode_score(self, requests: Sequence[tuple[TokenSeq, Sequence[TokenSeq]]]) -> list[list[Scored]]:
        """`decode_score_blocks`' results, every block run, in the requests' order."""
        return self.decode_score_blocks(requests).collect()

    def decode_score_blocks(self, requests: Sequence[tuple[TokenSeq, Sequence[TokenSeq]]]) -> Stream[list[Scored]]:
        """`score_blocks` computed through decoding steps, as `decode_logprobs` is: what a task's
        log-likelihoods become when every continuation token is read against the KV cache as
        generation keeps it (the lm-eval backend's `score_through_cache`). Each continuation is a
        sequence of its own: a request is handed over with the block that finishes its last one."""
        self._check_open()
        pairs = self._pairs(requests, "decode_score")
        owners = [i for i, (_, continuations) in enumerate(pairs) for _ in continuations]
        prompts = [context for context, continuations in pairs for _ in continuations]
        scored = self._decode_scored(prompts, [c for _, continuations in pairs for c in continuations], "decode_score")

        def combine(found: list[tuple[Tensor, Tensor]]) -> list[Scored]:
            return [Scored(float(lp.sum()), bool(greedy.all())) for lp, greedy in found]

        return self._started(scored.grouped(owners, len(pairs), combine))

    def _decode_scored(
        self, prompts: Sequence[TokenSeq], continuations: Sequence[TokenSeq], what: str
    ) -> Stream[tuple[Tensor, Tensor]]:
        """Each continuation's (log-probability, greedy) per token, through decoding steps."""
        seqs = as_token_lists(prompts, self.model.vocab_size, what)
        targets = as_token_lists(continuations, self.model.vocab_size, what)
        if len(targets) != len(seqs):
            raise FlexevalError(f"{what}: {len(seqs)} prompts but {len(targets)} continuations")
        self._check_positions([len(s) + len(c) - 1 for s, c in zip(seqs, targets)], what)
        scored: list[tuple[list[int], int, ScoreReadout | StreamedScoreReadout]] = []  # the running block's

        def readout(mb: list[int], t: int) -> Readout:
            wanted = torch.tensor([int(targets[i][t]) if t < len(targets[i]) else 0 for i in mb], device=self.device)
            score = self.score_readout(wanted)
            scored.append((mb, t, score))
            return ForcedReadout(score)

        @torch.inference_mode()
        def read(block: BlockResults[list[int]]) -> list[tuple[Tensor, Tensor]]:
            """The block's readouts, read once it ended (the next block's are not made yet)."""
            out = {
                i: (torch.empty(len(targets[i])), torch.empty(len(targets[i]), dtype=torch.bool)) for i in block.indices
            }
            for mb, t, score in scored:
                for i, lp, greedy in zip(mb, score.result().cpu().tolist(), score.greedy().cpu().tolist()):
                    if t < len(targets[i]):
                        out[i][0][t], out[i][1][t] = lp, greedy
            scored.clear()
            return [out[i] for i in block.indices]

        return self._decode(DecodeCall(seqs, torch.tensor([len(c) for c in targets]), readout)).map(read)

    def _decode(self, call: DecodeCall) -> Stream[list[int]]:
        """Each sequence's new tokens, a block at a time; those with no budget come first, empty."""
        lengths = {i: len(s) + int(call.budgets[i]) for i, s in enumerate(call.seqs) if call.budgets[i] > 0}
        blocks = self._cut(lengths)
        unread: dict[int, list[int]] = {i: [] for i in range(len(call.seqs)) if i not in lengths}
        return _stream(len(call.seqs), blocks, self._run_decode(call, blocks), unread)

    @torch.inference_mode()
    def _run_decode(self, call: DecodeCall, blocks: list[list[list[int]]]) -> Iterator[BlockResults[list[int]]]:
        """Prefill each block's prompts, then decode step by step."""
        seqs, budgets, readout, stops = call.seqs, call.budgets, call.readout, call.stops
        for block in blocks:
            timing, start = self._begin()
            most = max(int(budgets[mb].max()) for mb in block)  # steps every micro-batch of the block takes
            runs = [
                Decoding([seqs[i] for i in mb], budgets[mb], stops, self.device, call.stopped, most) for mb in block
            ]
            steps = [
                self._step(r.batch, r.batch.ids, r.positions, None, 0, r.prefill_rows(), readout(mb, 0))
                for mb, r in zip(block, runs)
            ]
            with self._block_state(len(block)) as state:
                prefill = time.perf_counter()
                outputs = self._pass(state, steps, timing, "new", lambda k, runs=runs: self._new_cache(runs[k]))
                prefill = time.perf_counter() - prefill
                while True:
                    fed = [r.record(out) for r, out in zip(runs, outputs)]
                    if all(r.done for r in runs):
                        break
                    steps = [self._decode_step(r, tokens, readout(mb, r.t)) for mb, r, tokens in zip(block, runs, fed)]
                    outputs = self._pass(state, steps, timing, "stored")
            found = {i: out for mb, run in zip(block, runs) for i, out in zip(mb, run.outputs)}
            stats = RunStats(
                sequences=len(found),
                prefill_tokens=sum(int(r.batch.lengths.sum()) for r in runs),
                decode_tokens=sum(len(out) for out in found.values()),
                prefill_seconds=prefill,
                decode_seconds=time.perf_counter() - start - prefill,
            )
            yield BlockResults(tuple(found), tuple(found.values()), self._end(timing, stats))

    def _cut(self, lengths: Mapping[int, int]) -> list[list[list[int]]]:
        """Sequence indices, longest first, cut into micro-batches (similar lengths share padding)
        of at most `gpu_batch_size` sequences and `gpu_batch_tokens` tokens, and those into blocks:
        the one cut of a call's requests, which its stream announces before any block runs."""
        keys, policy = list(lengths), self.policy
        cut = cut_blocks(
            [lengths[k] for k in keys], policy.gpu_batch_size, policy.gpu_batch_tokens, policy.num_gpu_batches
        )
        return [[[keys[i] for i in batch] for batch in block] for block in cut]

    @contextmanager
    def _block_state(self, micro_batches: int) -> Iterator[BlockState]:
        """A block's hidden states and caches, closed with its working memory before the next block."""
        tiers, blocks = self.tiers, self.model.num_blocks
        state = BlockState(tiers["act"], tiers["cache"], self.policy, micro_batches, blocks, self._restore_cache)
        try:
            yield state
        finally:
            state.close()
            release_free_memory()

    def _restore_cache(self, parts: Mapping[str, Tensor], stored: StoredValues | None) -> Cache:
        if self.policy.compress_cache:
            config = self.policy.comp_cache_config
            return QuantizedKVCache.from_parts(parts, self.model.head_dim, self.dtype, config, stored)
        return KVCache(parts["k"], parts["v"], stored)

    def _pass(
        self,
        state: BlockState,
        steps: list[Step],
        timing: Timing,
        cache_mode: CacheMode = "none",
        new_cache: Callable[[int], Cache] | None = None,
    ) -> list[Tensor]:
        """One pass of the block schedule; its readouts' logits must be finite (`flexeval.engine.finite`):
        one reduction per micro-batch, and only when it fails the pass again, inspected layer by layer."""
        plan, told = self.plan, self.on_unit
        done = None if told is None else lambda u: told((u + 1) / len(plan))
        args = (plan, self.weights, state, steps, self.io, timing, cache_mode, new_cache, self.heap)
        outputs = run_pass(self.model.layers, *args, done)
        if not bool(torch.stack([step.readout.finite() for step in steps]).all()):
            inspection = Inspection(self.model.layers)
            run_pass(inspection.layers, *args)
            raise inspection.error(self.weights, self.dtype)
        return outputs

    def _step(
        self,
        batch: PaddedBatch,
        ids: Tensor,
        pos: Tensor,
        mask: Tensor | None,
        cache_start: int,
        rows: Tensor,
        readout: Readout,
    ) -> Step:
        return Step.of(
            self.model,
            self.dtype,
            ids,
            pos,
            pads=batch.pads,
            attn_mask=mask,
            cache_start=cache_start,
            head_rows=rows,
            readout=readout,
            gemm_rows=self.gemm_rows,
        )

    def _packed_step(self, rows: list[Packed]) -> Step:
        """A micro-batch of packed rows, left-padded; the head reads each row's `heads`."""
        inputs = left_pad([r.ids for r in rows], self.device)
        width = inputs.width
        pos = left_pad([r.positions for r in rows], self.device).ids
        heads = torch.cat([r.heads + b * width + width - len(r) for b, r in enumerate(rows)]).to(self.device)
        targets = torch.cat([r.targets for r in rows]).to(self.device)
        mask = None  # plain sequences: padding, causality and the window say who sees what
        if any(len(r.spans) > 1 for r in rows):
            segments = left_pad([r.segments for r in rows], self.device).ids
            mask = packed_mask(inputs.valid, segments, self.model.sliding_window, pos)
        return self._step(inputs, inputs.ids, pos, mask, 0, heads, self.score_readout(targets))

    def _decode_step(self, run: Decoding, tokens: Tensor, readout: Readout) -> Step:
        column = run.batch.width + run.t - 1  # where the fed token's keys and values go
        rows = torch.arange(len(tokens), device=self.device)
        step = self._step(run.batch, tokens, run.positions, None, column, rows, readout)
        return replace(step, attn_sparsity=self.policy.attn_sparsity)

    def _new_cache(self, run: Decoding) -> Cache:
        shape = (len(run.outputs), self.model.kv_heads, run.cache_length, self.model.head_dim)
        if self.policy.compress_cache:
            return QuantizedKVCache.empty(shape, self.dtype, self.device, self.policy.comp_cache_config)
        return KVCache(
            torch.empty(shape, dtype=self.dtype, device=self.device),
            torch.empty(shape, dtype=self.dtype, device=self.device),
        )

    def _begin(self) -> tuple[Timing, float]:
        """A block's counting starts afresh, so that its stats are its own."""
        for tiers in self.tiers.values():
            for tier in tiers:
                if tier is not None:
                    tier.stats.reset()
        return Timing(), time.perf_counter()

    def _end(self, timing: Timing, stats: RunStats) -> RunStats:
        """A block's stats with what its passes' timing and the tiers counted."""
        tiers = {
            name: {tier.name: tier.stats.as_dict() for tier in tiers if tier is not None}
            for name, tiers in self.tiers.items()
        }
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return replace(
            stats,
            compute_seconds=timing.compute_seconds,
            io_wait_seconds=timing.wait_seconds,
            tiers=tiers,
            peak_rss_bytes=peak_rss,
        )

    def _budgets(self, max_new_tokens: int | Sequence[int], n: int) -> list[int]:
        """One budget per prompt, as Python ints: a huge one is then refused by `_check_positions`
        for the context window, not by an overflow in torch."""
        given = max_new_tokens.tolist() if isinstance(max_new_tokens, Tensor | np.ndarray) else max_new_tokens
        budgets = [given] * n if is_int(given) else given
        if isinstance(budgets, str) or not isinstance(budgets, Sequence):
            raise FlexevalError(f"max_new_tokens must be an int, or a list of one per prompt, got {max_new_tokens!r}")
        wrong = [b for b in budgets if not is_int(b)]
        if wrong:
            raise FlexevalError(f"max_new_tokens must be an int, or a list of one per prompt, got {wrong[0]!r}")
        if len(budgets) != n:
            raise FlexevalError(
                f"max_new_tokens has {len(budgets)} entries for {n} prompts: give one or one per prompt"
            )
        if min(budgets) < 0:
            raise FlexevalError(f"max_new_tokens must be >= 0, got {min(budgets)}")
        return [int(b) for b in budgets]

    def _check_positions(self, needed: Sequence[int], what: str) -> None:
        for i, n in enumerate(needed):
            if n > self.context_length:
                raise FlexevalError(
                    f"{what}: sequence {i} needs {n} positions but the model's context window is "
                    f"{self.context_length} tokens; shorten it"
                    + (" or generate fewer tokens" if what == "generate" else "")
                )

    def _text_stop(self, stop_strings: Sequence[str]) -> Callable[[list[int]], bool] | None:
        """Whether a sequence's new tokens spell a stop string; only their tail is decoded, as
        long as the longest stop string plus two tokens (a string can straddle token bounds).
        One string is refused, not taken as a stop at each of its characters."""
        if isinstance(stop_strings, str) or not isinstance(stop_strings, Iterable):
            raise FlexevalError(f"stop_strings must be a list of strings, e.g. ['\\n'], got {stop_strings!r}")
        given = list(stop_strings)
        if not all(isinstance(s, str) for s in given):
            raise FlexevalError(f"stop_strings must be a list of strings, e.g. ['\\n'], got {given!r}")
        strings = [s for s in given if s]
        if not strings:
            return None
        tail = max(len(self.tokenizer(s, add_special_tokens=False).input_ids) for s in strings) + 2

        def stopped(tokens: list[int]) -> bool:
            text = self.tokenizer.decode(tokens[-tail:])
            return any(s in text for s in strings)

        return stopped

    def _stop_ids(self, stop_token_ids: Sequence[int] | None) -> list[int]:
        if stop_token_ids is None:
            eos = self.tokenizer.eos_token_id
            return [] if eos is None else [eos]
        given = stop_token_ids.tolist() if isinstance(stop_token_ids, Tensor | np.ndarray) else stop_token_ids
        if isinstance(given, str) or not isinstance(given, Iterable):
            raise FlexevalError(f"stop_token_ids must be a list of token ids (ints), got {stop_token_ids!r}")
        ids = list(given)
        if not all(is_int(t) for t in ids):
            raise FlexevalError(f"stop_token_ids must be a list of token ids (ints), got {ids!r}")
        outside = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if outside:
            raise FlexevalError(
                f"stop_token_ids has ids outside the vocabulary [0, {self.model.vocab_size}): {outside[:5]}"
            )
        return [int(t) for t in ids]


def _check_native(spec: str | Path, model: Model, policy: Policy) -> None:
    """compression=native on a checkpoint with no llama.cpp blocks would silently load it dense."""
    if policy.native_weights and not any(native(p, policy) for layer in model.layers for p in layer.params.values()):
        raise FlexevalError(
            f"compression=native keeps the llama.cpp blocks of a GGUF file; {spec} has none it can keep: "
            "use compression=none or a quantizing preset (4bit-weights, ...)"
        )


def _gptq_fit(
    spec: str | Path,
    model: Model,
    directory: Path,
    policy: Policy,
    dtype: torch.dtype,
    device: torch.device,
    calibration: Calibration | None,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path | None,
) -> FittedWeights:
    """The GPTQ fit the weights are stored through, made before any offload folder exists: a fit
    without calibration text is refused while nothing is yet on disk."""
    if calibration is None:
        raise FlexevalError(f"a gptq fit of {spec} needs text to fit to: pass calibration=Calibration(path=...)")
    return FittedWeights(
        model,
        checkpoint=directory,
        config=replace(policy.comp_weight_config, kernel="dequantize"),  # codes by rows; tiled when stored
        dtype=dtype,
        device=device,
        calibration=calibration,
        tokenizer=tokenizer,
        cache=registry.cache_root(cache_dir),
    )


def _store_weights(
    spec: str | Path,
    model: Model,
    checkpoint: Source,
    policy: Policy,
    dtype: torch.dtype,
    device: torch.device,
    workdir: Path | None,
    fitted: FittedWeights | None,
) -> tuple[dict[str, tuple[Tier, Tier, Tier | None]], WeightStore]:
    """Every layer's weights checked finite (`WeightCheck`) and put in their tiers. A fit needs
    whole weights, so only an unfitted load reads them lazily. A load that fails part way removes
    its offload folder at once: this process lives on, and only a dead one's folders are reclaimed."""
    layers = iter_weights(model, checkpoint, dtype, lambda param: native(param, policy), lazy=fitted is None)
    try:
        tiers = {name: _make_tiers(name, device, policy, workdir, durable=name == "weights") for name in TENSOR_CLASSES}
        store = WeightStore(model.layers, tiers["weights"], policy, dtype)
        progress = tqdm(layers, total=len(model.layers), desc=_loading(spec, policy), unit="layer")
        check = WeightCheck(model, checkpoint)
        for j, bundle in enumerate(progress):
            bundle = check(j, bundle)
            store.put(j, bundle, fitted.layer(j, bundle) if fitted else None)
        if fitted:
            fitted.save()
    except BaseException:
        if workdir is not None:
            ownership.remove(workdir)
        raise
    return tiers, store


def _stream(
    size: int, blocks: list[list[list[int]]], run: Iterator[BlockResults[R]], unread: Mapping[int, R]
) -> Stream[R]:
    """A call's stream over its blocks' micro-batches; items that need no pass (nothing to read,
    nothing to generate) are handed over first, as they are, with no cost."""
    planned = [tuple(i for mb in block for i in mb) for block in blocks]
    if unread:
        planned.insert(0, tuple(unread))
        run = chain([BlockResults(tuple(unread), tuple(unread.values()), RunStats())], run)
    return Stream(size, planned, run)


def _loading(spec: str | Path, policy: Policy) -> str:
    """What the progress bar of `Engine.load` says it is doing."""
    doing = f"loading {Path(str(spec)).name}"
    if policy.compress_weight:
        doing += f", quantizing to {policy.comp_weight_config.num_bits} bits"
    if policy.split(TensorClass.WEIGHTS)[2] > 0:
        doing += ", writing the disk share"
    return doing


def _cleanup(io: Executors, workdir: Path | None) -> None:
    io.shutdown()
    if workdir is not None:
        ownership.remove(workdir)
