"""`Engine`: a loaded model that scores and generates token sequences through the block schedule.

The engine sorts sequences by length, cuts them into blocks of `gpu_batch_size ×
num_gpu_batches` and each block into micro-batches, and runs each block through the schedule,
which streams every layer's weights from their tiers once per block. It owns the padding, the
masks, the KV cache and the readout of the head (log-probabilities of given tokens, or the next
token), so models stay pure layer math and the schedule stays one loop.
"""

from __future__ import annotations

import resource
import shutil
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from flexeval import ownership
from flexeval.engine.batch import (
    Packed,
    PaddedBatch,
    TokenSeq,
    as_token_ids,
    as_token_lists,
    is_int,
    left_pad,
    micro_batches,
    pack,
    packed_mask,
)
from flexeval.engine.device import AUTO, resolve_device, resolve_dtype
from flexeval.engine.finite import Inspection, WeightCheck
from flexeval.engine.generation import Decoding, Sampling
from flexeval.engine.heap import Heap, map_large_buffers, release_free_memory, reuse_compute_buffers
from flexeval.engine.kv_cache import QuantizedKVCache
from flexeval.engine.placement import BlockState, WeightStore, native, weight_bytes_per_tier
from flexeval.engine.policy import Policy
from flexeval.engine.readout import ForcedReadout, ScoreReadout, StreamedScoreReadout, TokenReadout
from flexeval.engine.schedule import CacheMode, Executors, Timing, Unit, run_pass, units
from flexeval.engine.tiers import DiskTier, MemoryTier, Tier
from flexeval.errors import FlexevalError
from flexeval.models import registry
from flexeval.models.checkpoint import iter_weights, open_checkpoint
from flexeval.models.common import KVCache, Model, Readout, Step, StoredValues
from flexeval.quantization import int4mm
from flexeval.quantization.calibration import Calibration
from flexeval.quantization.gptq import FittedWeights
from flexeval.reproducible import safe_gemm_rows

TENSOR_CLASSES = ("weights", "cache", "act")


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
        self.stats = RunStats()
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
        if policy.native_weights and not any(
            native(p, policy) for layer in model.layers for p in layer.params.values()
        ):
            raise FlexevalError(
                f"compression=native keeps the llama.cpp blocks of a GGUF file; {spec} has none it can keep: "
                "use compression=none or a quantizing preset (4bit-weights, ...)"
            )
        checkpoint = open_checkpoint(directory)
        gptq = policy.compress_weight and policy.comp_weight_config.fit == "gptq"  # fits need whole weights
        layers = iter_weights(model, checkpoint, dtype, lambda param: native(param, policy), lazy=not gptq)
        uses_disk = any(policy.split(kind)[2] > 0 for kind in ("w", "cache", "act"))
        on_disk = weight_bytes_per_tier(model.layers, policy, dtype)[2]
        fitted = None
        if gptq:
            if calibration is None:
                raise FlexevalError(
                    f"a gptq fit of {spec} needs text to fit to: pass calibration=Calibration(path=...)"
                )
            fitted = FittedWeights(
                model,
                checkpoint=directory,
                config=replace(policy.comp_weight_config, kernel="dequantize"),  # codes by rows; tiled when stored
                dtype=dtype,
                device=device,
                calibration=calibration,
                tokenizer=tokenizer,
                cache=registry.cache_root(cache_dir),
            )
        workdir = _prepare_offload_dir(offload_dir, on_disk) if uses_disk else None
        try:
            tiers = {
                name: _make_tiers(name, device, policy, workdir, durable=name == "weights") for name in TENSOR_CLASSES
            }
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

    @torch.inference_mode()
    def logprobs(self, sequences: Sequence[TokenSeq]) -> list[Tensor]:
        """lp[i][t] = log p(sequences[i][t + 1] | sequences[i][: t + 1]), as float32 on the CPU."""
        self._check_open()
        seqs = as_token_lists(sequences, self.model.vocab_size, "logprobs")
        # the last token is only ever a target, so the model reads each sequence but its last token
        self._check_positions([len(s) - 1 for s in seqs], "logprobs")
        rows = {i: pack(s[:1], [s[1:]]) for i, s in enumerate(seqs) if len(s) > 1}
        scored = self._score(rows)
        return [scored[i][0] if i in scored else torch.empty(0) for i in range(len(seqs))]

    @torch.inference_mode()
    def score(self, requests: Sequence[tuple[TokenSeq, Sequence[TokenSeq]]]) -> list[list[Scored]]:
        """For each (context, continuations): every continuation's log-likelihood given the context,
        and whether greedy decoding would produce it. A request's context is computed once for all
        of its continuations (a multiple-choice document's endings share one sequence)."""
        self._check_open()
        if not isinstance(requests, Sequence) or not requests:
            raise FlexevalError("score takes a non-empty list of (context, continuations) pairs")
        rows = {}
        for i, request in enumerate(requests):
            if not (isinstance(request, Sequence) and len(request) == 2 and request[1]):
                raise FlexevalError(f"score: request {i} is not a (context, [continuation, ...]) pair")
            context, continuations = request
            vocab = self.model.vocab_size
            context = as_token_ids(context, vocab, f"score: request {i}'s context")
            rows[i] = pack(context, as_token_lists(continuations, vocab, f"score: request {i}'s continuations"))
        self._check_positions([int(r.positions.max()) + 1 for r in rows.values()], "score")
        scored = self._score(rows)
        results = []
        for i in range(len(requests)):
            logprobs, greedy = scored[i]
            spans = zip(logprobs.split(rows[i].spans), greedy.split(rows[i].spans))
            results.append([Scored(float(lp.sum()), bool(g.all())) for lp, g in spans])
        return results

    def _score(self, rows: dict[int, Packed]) -> dict[int, tuple[Tensor, Tensor]]:
        """Every row's (log-probability, greedy) per target, through the block schedule."""
        results = {}
        timing, start = self._begin()
        for block in self._blocks({i: len(row) for i, row in rows.items()}):
            steps = [self._packed_step([rows[i] for i in mb]) for mb in block]
            state = self._block_state(len(block))
            try:
                outputs = self._pass(state, steps, timing)
            finally:
                state.close()
                release_free_memory()  # the block's state and working memory, before the next block
            for mb, step, out in zip(block, steps, outputs):
                counts = [len(rows[i].targets) for i in mb]
                for i, lp, greedy in zip(mb, out.cpu().split(counts), step.readout.greedy().cpu().split(counts)):
                    results[i] = (lp, greedy)
        self.stats.sequences = len(rows)
        self.stats.prefill_tokens = sum(len(row) for row in rows.values())
        self.stats.prefill_seconds = time.perf_counter() - start
        self._end(timing)
        return results

    @torch.inference_mode()
    def generate(
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
    ) -> list[list[int]]:
        """New token ids for each prompt: greedy unless temperature > 0.

        A sequence ends after `max_new_tokens` (one number, or one per prompt), with a stop
        token (default: the tokenizer's end-of-sequence), or once its decoded text contains one
        of `stop_strings`; the stopping token is included in its output. A block stops as soon
        as all of its sequences have.
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

        return self._decode(seqs, torch.tensor(budgets), stops, stopped, readout)

    @torch.inference_mode()
    def decode_logprobs(self, prompts: Sequence[TokenSeq], continuations: Sequence[TokenSeq]) -> list[Tensor]:
        """log p of each continuation token given the prompt and the tokens before it, computed as
        generation computes it: the prompt prefilled, then one decoding step per token against the
        KV cache (compressed, or read sparsely, as the policy says). `logprobs` scores a whole
        sequence in one exact pass; this measures what the cache's approximations cost."""
        self._check_open()
        return [logprob for logprob, _ in self._decode_scored(prompts, continuations, "decode_logprobs")]

    def decode_score(self, requests: Sequence[tuple[TokenSeq, Sequence[TokenSeq]]]) -> list[list[Scored]]:
        """`score` computed through decoding steps, as `decode_logprobs` is: what a task's
        log-likelihoods become when every continuation token is read against the KV cache as
        generation keeps it (the lm-eval backend's `score_through_cache`)."""
        self._check_open()
        if not isinstance(requests, Sequence) or not requests:
            raise FlexevalError("decode_score takes a non-empty list of (context, continuations) pairs")
        prompts, continuations = [], []
        for i, request in enumerate(requests):
            if not (isinstance(request, Sequence) and len(request) == 2 and request[1]):
                raise FlexevalError(f"decode_score: request {i} is not a (context, [continuation, ...]) pair")
            prompts += [request[0]] * len(request[1])
            continuations += list(request[1])
        scored = iter(self._decode_scored(prompts, continuations, "decode_score"))
        return [
            [Scored(float(lp.sum()), bool(greedy.all())) for lp, greedy in islice(scored, len(conts))]
            for _, conts in requests
        ]

    def _decode_scored(
        self, prompts: Sequence[TokenSeq], continuations: Sequence[TokenSeq], what: str
    ) -> list[tuple[Tensor, Tensor]]:
        """Each continuation's (log-probability, greedy) per token, through decoding steps."""
        seqs = as_token_lists(prompts, self.model.vocab_size, what)
        targets = as_token_lists(continuations, self.model.vocab_size, what)
        if len(targets) != len(seqs):
            raise FlexevalError(f"{what}: {len(seqs)} prompts but {len(targets)} continuations")
        self._check_positions([len(s) + len(c) - 1 for s, c in zip(seqs, targets)], what)
        scored: list[tuple[list[int], int, ScoreReadout | StreamedScoreReadout]] = []

        def readout(mb: list[int], t: int) -> Readout:
            wanted = torch.tensor([int(targets[i][t]) if t < len(targets[i]) else 0 for i in mb], device=self.device)
            score = self.score_readout(wanted)
            scored.append((mb, t, score))
            return ForcedReadout(score)

        budgets = torch.tensor([len(c) for c in targets])
        self._decode(seqs, budgets, torch.zeros(0, dtype=torch.long), None, readout)
        out = [(torch.empty(len(c)), torch.empty(len(c), dtype=torch.bool)) for c in targets]
        for mb, t, score in scored:
            for i, lp, greedy in zip(mb, score.result().cpu().tolist(), score.greedy().cpu().tolist()):
                if t < len(targets[i]):
                    out[i][0][t], out[i][1][t] = lp, greedy
        return out

    def _decode(
        self,
        seqs: list[Tensor],
        budgets: Tensor,
        stops: Tensor,
        stopped: Callable[[list[int]], bool] | None,
        readout: Callable[[list[int], int], Readout],
    ) -> list[list[int]]:
        """Prefill each block's prompts, then decode step by step; `readout(micro_batch, t)` says
        what becomes of the logits predicting each sequence's t-th new token, and which tokens
        are fed on."""
        results: list[list[int]] = [[] for _ in seqs]
        timing, start = self._begin()
        for block in self._blocks({i: len(s) + int(budgets[i]) for i, s in enumerate(seqs) if budgets[i] > 0}):
            most = max(int(budgets[mb].max()) for mb in block)  # steps every micro-batch of the block takes
            runs = [Decoding([seqs[i] for i in mb], budgets[mb], stops, self.device, stopped, most) for mb in block]
            steps = [
                self._step(r.batch, r.batch.ids, r.positions, None, 0, r.prefill_rows(), readout(mb, 0))
                for mb, r in zip(block, runs)
            ]
            state = self._block_state(len(block))
            try:
                prefill = time.perf_counter()
                outputs = self._pass(state, steps, timing, "new", lambda k, runs=runs: self._new_cache(runs[k]))
                self.stats.prefill_seconds += time.perf_counter() - prefill
                self.stats.prefill_tokens += sum(int(r.batch.lengths.sum()) for r in runs)
                while True:
                    fed = [r.record(out) for r, out in zip(runs, outputs)]
                    if all(r.done for r in runs):
                        break
                    steps = [self._decode_step(r, tokens, readout(mb, r.t)) for mb, r, tokens in zip(block, runs, fed)]
                    outputs = self._pass(state, steps, timing, "stored")
            finally:
                state.close()
                release_free_memory()  # the block's state and working memory, before the next block
            for mb, run in zip(block, runs):
                for i, out in zip(mb, run.outputs):
                    results[i] = out
        elapsed = time.perf_counter() - start
        self.stats.decode_seconds = elapsed - self.stats.prefill_seconds
        self.stats.decode_tokens = sum(len(r) for r in results)
        self.stats.sequences = int((budgets > 0).sum())
        self._end(timing)
        return results

    def _blocks(self, lengths: Mapping[int, int]) -> Iterator[list[list[int]]]:
        """Sequence indices, longest first, cut into micro-batches (similar lengths share padding)
        of at most `gpu_batch_size` sequences and `gpu_batch_tokens` tokens, and those into blocks."""
        order = sorted(lengths, key=lambda i: -lengths[i])
        policy, batches, start = self.policy, [], 0
        for count in micro_batches([lengths[i] for i in order], policy.gpu_batch_size, policy.gpu_batch_tokens):
            batches.append(order[start : start + count])
            start += count
        for b in range(0, len(batches), policy.num_gpu_batches):
            yield batches[b : b + policy.num_gpu_batches]

    def _block_state(self, micro_batches: int) -> BlockState:
        tiers, blocks = self.tiers, self.model.num_blocks
        return BlockState(tiers["act"], tiers["cache"], self.policy, micro_batches, blocks, self._restore_cache)

    def _restore_cache(self, parts: Mapping[str, Tensor], stored: StoredValues | None) -> KVCache:
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
        new_cache: Callable[[int], KVCache] | None = None,
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
        rope = self.model.rotary(pos, self.dtype) if self.model.rotary else None
        window = self.model.sliding_window
        return Step(ids, pos, batch.pads, mask, cache_start, rows, readout, rope, window, gemm_rows=self.gemm_rows)

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

    def _new_cache(self, run: Decoding) -> KVCache:
        shape = (len(run.outputs), self.model.kv_heads, run.cache_length, self.model.head_dim)
        if self.policy.compress_cache:
            return QuantizedKVCache.empty(shape, self.dtype, self.device, self.policy.comp_cache_config)
        return KVCache(
            torch.empty(shape, dtype=self.dtype, device=self.device),
            torch.empty(shape, dtype=self.dtype, device=self.device),
        )

    def _begin(self) -> tuple[Timing, float]:
        self.stats = RunStats()
        for tiers in self.tiers.values():
            for tier in tiers:
                if tier is not None:
                    tier.stats.reset()
        return Timing(), time.perf_counter()

    def _end(self, timing: Timing) -> None:
        self.stats.compute_seconds = timing.compute_seconds
        self.stats.io_wait_seconds = timing.wait_seconds
        self.stats.tiers = {
            name: {tier.name: tier.stats.as_dict() for tier in tiers if tier is not None}
            for name, tiers in self.tiers.items()
        }
        self.stats.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

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


def _loading(spec: str | Path, policy: Policy) -> str:
    """What the progress bar of `Engine.load` says it is doing."""
    doing = f"loading {Path(str(spec)).name}"
    if policy.compress_weight:
        doing += f", quantizing to {policy.comp_weight_config.num_bits} bits"
    if policy.split("w")[2] > 0:
        doing += ", writing the disk share"
    return doing


def _cleanup(io: Executors, workdir: Path | None) -> None:
    io.shutdown()
    if workdir is not None:
        ownership.remove(workdir)
