"""The lm-evaluation-harness backend `flexgen`: lm-eval's requests run through flexeval's engine.

lm-eval hands a backend every request of one type, from every task, in one call. `TemplateLM`
tokenizes (context, continuation) pairs exactly as the `hf` backend does; this class only
decides how to run them: requests that share a context (the endings of one multiple-choice
document) become one packed sequence that computes the context once, everything is sorted by
length so that blocks carry little padding, and each block's results reach lm-eval's cache as
soon as the block ends, so that `--use_cache` resumes a killed run.

Importing this module registers `flexgen` (lm-eval 0.4.13 reads no plugin entry points);
`flexeval-lm-eval` (`flexeval.lm_eval`) is lm-eval's own command line with it registered.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, TypeVar

import lm_eval.models  # noqa: F401 - lm-eval's own backends first: a non-empty registry is never filled again
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from flexeval.data import data_dir
from flexeval.engine.device import resolve_device, resolve_dtype
from flexeval.engine.engine import Engine, RunStats, Stream
from flexeval.engine.generation import Sampling
from flexeval.engine.policy import Policy, compression_fields
from flexeval.errors import FlexevalError, first_line
from flexeval.models import registry
from flexeval.models.registry import DEFAULT_MODEL
from flexeval.planning.cost_model import Workload
from flexeval.planning.request import AUTO, PolicyRequest, checked_max_length
from flexeval.planning.search import Choice
from flexeval.quantization.calibration import Calibration

log = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256
LoglikelihoodRequest = tuple[tuple[str, str], list[int], list[int]]
T = TypeVar("T")
DEFAULT_POLICY = "all-resident"
BAR_FORMAT = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


@dataclass
class Usage:
    """What the backend did since this was made: the efficiency half of an accuracy-and-throughput table.

    Prompt tokens are the tokens the engine computed (a shared context once); peak bytes are,
    per tier, the most that weights, cache and activations held together during one engine call.
    `lengths` are the sequences the engine ran (a packed context and its endings, a window, a
    prompt), `scored_tokens` those whose logits were read: the workload `explain` costs again.
    """

    requests: int = 0
    sequences: int = 0  # what the engine ran: a multiple-choice document's endings are one
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    compute_seconds: float = 0.0
    io_wait_seconds: float = 0.0
    peak_bytes: dict[str, int] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    scored_tokens: int = 0

    def add(self, stats: RunStats, requests: int, seconds: float) -> None:
        self.requests += requests
        self.sequences += stats.sequences
        self.prompt_tokens += stats.prefill_tokens
        self.generated_tokens += stats.decode_tokens
        self.seconds += seconds
        self.compute_seconds += stats.compute_seconds
        self.io_wait_seconds += stats.io_wait_seconds
        held: Counter[str] = Counter()
        for tiers in stats.tiers.values():
            for tier, figures in tiers.items():
                held[tier] += int(figures["peak_bytes"])
        for tier, nbytes in held.items():
            self.peak_bytes[tier] = max(self.peak_bytes.get(tier, 0), nbytes)

    def report(self, wall: float) -> dict[str, Any]:
        """The counts, and rates over `wall` seconds (a task's, lm-eval's own work included)."""
        tokens = self.prompt_tokens + self.generated_tokens
        rates = {"requests_per_second": self.requests / wall, "tokens_per_second": tokens / wall} if wall else {}
        return asdict(self) | {"wall_seconds": wall} | rates


@dataclass(frozen=True)
class _Generation:
    """One group of generation requests (the same settings), ready to run."""

    prompts: list[list[int]]
    max_gen_toks: int
    until: list[str]
    sampling: dict[str, Any]


@register_model("flexgen")
class FlexGenLM(TemplateLM):
    """flexeval's engine behind lm-eval's model interface.

    `policy` names a preset (all-resident, cpu-offload, disk-offload), or is a `Policy`, and any
    `Policy` field may be given by its own name. lm-eval's `--batch_size N` sets `gpu_batch_size`
    unless that is given (the command line's default of 1 leaves the policy's own); `auto` (or
    lm-eval's `auto:N`) is `policy=auto`, whose search sizes blocks within the memory budgets;
    `--max_batch_size` caps `gpu_batch_size` whichever policy set it. What `hf` accepts is taken
    where it means something here: `dtype=auto` is the checkpoint's own, `revision` chooses a hub
    checkpoint's branch, tag or commit, `trust_remote_code=False` is what flexeval always does
    (True is refused: no code from a model repository is ever run).
    `policy=auto` plans for the requests lm-eval hands over, counted (each request type's in turn,
    as they come: a plan for scoring need not hold the KV cache that generation needs), and loads
    the model then; `sequences`, `prompt_len` and `gen_len` replace what is counted, and with all
    three given the plan and the model are made at once. Budgets (`gpu_mem_gb`, `cpu_mem_gb`,
    `disk_gb`) bound the search, and a fixed policy's weights must fit them. The model_args are
    parsed and checked as the Hydra app's options are (`flexeval.planning.request`).
    `usage` counts requests, tokens, time and memory for throughput reports.
    `score_through_cache` scores log-likelihoods through decoding steps against the KV cache
    (`Engine.decode_score`), one token at a time as generation reads them, instead of one exact
    pass: what a compressed cache or sparse attention costs a task (slower; off by default).
    `calibration` ('path[:field[:sequences[:length]]]') is the text a GPTQ fit of the weights
    (`comp_weight_config=4:64:1:gptq`, preset `4bit-weights-gptq`) is fitted to.
    """

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        dtype: str = "auto",
        policy: str | Policy = DEFAULT_POLICY,
        offload_dir: str | None = None,
        compression: str | None = "none",
        device: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        seed: int = 0,
        score_through_cache: bool = False,
        calibration: str | Calibration | None = None,
        revision: str | None = None,
        trust_remote_code: bool | str = False,
        gpu_mem_gb: float | None = None,
        cpu_mem_gb: float | None = None,
        disk_gb: float | None = None,
        sequences: int | str | None = None,
        prompt_len: int | str | None = None,
        gen_len: int | str | None = None,
        **policy_fields: Any,
    ) -> None:
        super().__init__()
        policy_fields = compression_fields(compression or "none") | policy_fields  # lm-eval reads "none" as None
        pretrained = _hub_revision(str(pretrained), revision, trust_remote_code)
        policy = _batch_size(batch_size, policy, policy_fields)
        _check_model_args(policy_fields, score_through_cache)
        self.request = _policy_request(
            policy,
            policy_fields,
            {"gpu_mem_gb": gpu_mem_gb, "cpu_mem_gb": cpu_mem_gb, "disk_gb": disk_gb},
            {"sequences": sequences, "prompt_len": prompt_len, "gen_len": gen_len},
        )
        self._init_distributed()
        directory = registry.resolve(pretrained)
        self._max_length = checked_max_length(max_length, registry.build_model(directory).context_length)
        self._device = resolve_device(_device(device, self._world_size))
        self.dtype = resolve_dtype(dtype, self._device, directory)
        self.pretrained = str(pretrained)
        self.offload_dir = offload_dir
        self.calibration = Calibration.parse(calibration or Calibration()).under(data_dir())
        self.max_batch_size = max_batch_size
        self.tokenizer = registry.load_tokenizer(directory)
        self.add_bos_token = add_bos_token
        self.seed = seed
        self.score_through_cache = score_through_cache
        self.usage = Usage()
        self.choice: Choice | None = None  # what policy=auto chose last, with its prediction
        self.predictions: dict[str, dict[str, Any]] = {}  # request type -> what policy=auto predicted for it
        self._engine: Engine | None = None
        if not self.request.auto:
            self._load(self.request.fixed(pretrained, self.dtype))
        elif self.request.workload_given:
            self._plan(None, "given workload")

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise FlexevalError("flexgen: policy=auto loads the model once it has the requests to plan for")
        return self._engine

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    @property
    def score(self) -> Callable[[list], Stream]:
        """Log-likelihoods in one exact pass, or through the KV cache (`score_through_cache`)."""
        return self.engine.decode_score_blocks if self.score_through_cache else self.engine.score_blocks

    def _load(self, policy: Policy) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine = Engine.load(
            self.pretrained,
            dtype=self.dtype,
            device=self._device,
            policy=_capped(policy, self.max_batch_size),
            offload_dir=self.offload_dir,
            calibration=self.calibration,
        )

    def _plan(self, counted: Workload | None, what: str) -> None:
        """policy=auto: the search's plan for these requests (a model planned for another plan is
        loaded again); nothing when the workload was given whole and planned for at the start."""
        if not self.request.auto or (self.request.workload_given and self._engine is not None):
            return
        workload = self.request.planned_for(counted)
        self.choice = self.request.plan(
            self.pretrained, workload, dtype=self.dtype, device=self._device, offload_dir=self.offload_dir
        )
        self.predictions[what] = self.choice.prediction.as_dict()
        log.info("policy=auto chose for the %s: %s", what, self.choice.summary())
        if self._engine is None or _capped(self.choice.policy, self.max_batch_size) != self._engine.policy:
            self._load(self.choice.policy)

    # --- what lm-eval asks of every backend -------------------------------------------------

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results beside its own arguments (whose `device` and `batch_size`
        echo the command line): the device, dtype and blocks that ran, and the throughput over
        the time spent in this backend."""
        info: dict[str, Any] = {"throughput": self.usage.report(self.usage.seconds)}
        if self._engine is not None:
            policy = self.policy
            info |= {"gpu_batch_size": policy.gpu_batch_size, "num_gpu_batches": policy.num_gpu_batches}
            info |= {"block_size": policy.block_size}
        if self.predictions:
            info["prediction"] = self.predictions
        return {"model_dtype": str(self.dtype), "model_device": str(self._device), "flexgen": info}

    @property
    def batch_sizes(self) -> dict[str, int]:
        """lm-eval records these as the batch sizes that ran: ours are blocks of micro-batches."""
        return {} if self._engine is None else {"gpu_batch_size": self.policy.gpu_batch_size}

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As the `hf` backend encodes: the tokenizer's own special tokens unless told otherwise,
        and none when the string already starts with the prefix token."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = False
        kwargs = {} if special is None else {"add_special_tokens": special}
        return self.tokenizer.encode(string, **kwargs)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # --- the three request types ----------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[LoglikelihoodRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Requests with the same context tokens are scored as one packed sequence. An empty
        continuation is certain: log-likelihood 0, and greedy."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        continuations: dict[int, list[int]] = {}
        truncated = empty = 0
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                empty += 1
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                continue
            fitted = self._fit(context, continuation)
            truncated += len(fitted) < len(context)
            groups.setdefault(tuple(fitted), []).append(i)
            continuations[i] = continuation
        if truncated:
            log.warning("%d requests exceed the %d-token window: contexts cut on the left", truncated, self.max_length)
        if empty:
            log.warning("%d requests have an empty continuation: log-likelihood 0 (certain), greedy", empty)
        packed = [(list(ctx), [continuations[i] for i in members]) for ctx, members in groups.items()]
        if not packed:
            return results
        owners = list(groups.values())

        def record(g: int, scored: list) -> None:
            for i, s in zip(owners[g], scored):
                results[i] = (s.logprob, s.greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])

        sizes = [len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in packed]
        scored = [sum(len(c) for c in conts) for _, conts in packed]
        self._plan(Workload.counted(sizes, scored=scored, endings=len(continuations)), "loglikelihood requests")
        self.usage.lengths += sizes
        self.usage.scored_tokens += sum(scored)
        self._in_blocks(packed, sizes, self.score, record, "loglikelihood", [len(m) for m in owners], disable_tqdm)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's disjoint windows of every document, batched together across documents."""
        if not requests:
            return []
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((context, [continuation]))
                owner.append(i)
        totals = [0.0] * len(requests)
        remaining = Counter(owner)

        def record(w: int, scored: list) -> None:
            i = owner[w]
            totals[i] += scored[0].logprob
            remaining[i] -= 1
            if remaining[i] == 0:
                self.cache_hook.add_partial("loglikelihood_rolling", requests[i].args, totals[i])

        sizes = [len(ctx) + len(conts[0]) - 1 for ctx, conts in windows]
        last = [int(w == len(owner) - 1 or owner[w + 1] != owner[w]) for w in range(len(owner))]  # a document done
        scored = [len(conts[0]) for _, conts in windows]
        self._plan(Workload.counted(sizes, scored=scored, endings=len(windows)), "loglikelihood_rolling requests")
        self.usage.lengths += sizes
        self.usage.scored_tokens += sum(scored)
        self._in_blocks(windows, sizes, self.score, record, "loglikelihood_rolling", last, disable_tqdm)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Grouped by generation settings; each group generated longest prompt first."""
        if not requests:
            return []
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        prepared = [self._generation(requests, members) for members in groups.values()]
        lengths = [len(p) for group in prepared for p in group.prompts]
        gen_len = max(group.max_gen_toks for group in prepared)
        self._plan(Workload.counted(lengths, gen_len=gen_len), "generate_until requests")
        self.usage.lengths += lengths
        for members, group in zip(groups.values(), prepared):
            self._generate_group(requests, members, group, results, disable_tqdm)
        return results

    def _generation(self, requests: list, members: list[int]) -> _Generation:
        """A group's prompts, cut to leave room for its tokens, and its settings."""
        try:
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], DEFAULT_MAX_GEN_TOKS)
        except (TypeError, ValueError) as err:  # lm-eval's own reading of the settings, e.g. temperature=abc
            raise FlexevalError(f"generation settings {requests[members[0]].args[1]}: {first_line(err)}") from err
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tokenizer.decode(self.eot_token_id))
        max_gen_toks = kwargs.pop("max_gen_toks")
        if max_gen_toks >= self.max_length:
            raise FlexevalError(
                f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the {self.max_length}-token window"
            )
        sampling = _sampling(kwargs, self.seed)
        room = self.max_length - max_gen_toks
        prompts = [self.tok_encode(requests[i].args[0]) for i in members]
        cut = sum(len(p) > room for p in prompts)
        if cut:
            log.warning("%d prompts exceed %d tokens (window minus max_gen_toks): cut on the left", cut, room)
        return _Generation([p[-room:] for p in prompts], max_gen_toks, until, sampling)

    def _generate_group(
        self, requests: list, members: list[int], group: _Generation, results: list[str], disable_tqdm: bool
    ) -> None:
        def generate(prompts: list[list[int]]) -> Stream[list[int]]:
            stops = [self.eot_token_id]
            return self.engine.generate_blocks(
                prompts, group.max_gen_toks, stop_token_ids=stops, stop_strings=group.until, **group.sampling
            )

        def record(k: int, tokens: list[int]) -> None:
            i = members[k]
            results[i] = postprocess_generated_text(self.tok_decode(tokens), group.until, None)
            self.cache_hook.add_partial("generate_until", requests[i].args, results[i])

        sizes = [len(p) for p in group.prompts]
        passes = group.max_gen_toks
        self._in_blocks(group.prompts, sizes, generate, record, "generate_until", None, disable_tqdm, passes=passes)

    # --- batching, progress, caching ------------------------------------------------------------

    def _in_blocks(
        self,
        items: list[T],
        sizes: Sequence[int],
        run: Callable[[list[T]], Stream],
        record: Callable[[int, Any], None],
        what: str,
        counts: Sequence[int] | None,
        disable_tqdm: bool,
        passes: int = 1,
    ) -> None:
        """All the items to the engine at once, which sorts and cuts them into blocks (its cut is the
        only one), and each block's results recorded and shown as soon as the engine hands them
        over. `counts`: the lm-eval requests each item completes (default one). The bar moves
        within a block too, as the engine finishes each unit of its `passes` passes (generation:
        at most one a token), sized by the block the stream says runs next."""
        began = start = time.perf_counter()
        stream = run(items)
        total = sum(counts) if counts else len(items)
        bar = tqdm(
            total=total,
            desc=f"flexgen {what}",
            unit="req",
            disable=disable_tqdm or self._rank != 0,
            bar_format=BAR_FORMAT,  # whole requests, though a block's share of them moves in fractions
        )

        def requests(indices: Sequence[int]) -> int:
            return sum(counts[i] for i in indices) if counts else len(indices)

        def progress(indices: Sequence[int], tokens: int) -> _BlockProgress:
            return _BlockProgress(bar, requests(indices), passes, tokens, sum(sizes[i] for i in indices), start)

        tokens, blocks = 0, stream.blocks
        watch = self.engine.on_unit = progress(blocks[0], tokens) if blocks else None
        try:
            for b, block in enumerate(stream):  # the engine runs the next block only once this one is recorded
                done = requests(block.indices)
                self.usage.add(block.stats, done, time.perf_counter() - began)
                for i, result in zip(block.indices, block.results):
                    record(i, result)
                tokens += block.stats.prefill_tokens + block.stats.decode_tokens
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
                if b + 1 < len(blocks):
                    bar.update(watch.floor + done - bar.n)
                    watch = self.engine.on_unit = progress(blocks[b + 1], tokens)
                else:  # the last block: shown once, by close (a final update would print the line twice)
                    bar.n = total
                began = time.perf_counter()
        finally:
            self.engine.on_unit = None
        bar.close()

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context, left-truncated as the `hf` backend does so that the model reads at most
        max_length tokens (context and continuation but its last token)."""
        if len(continuation) > self.max_length:
            raise FlexevalError(
                f"loglikelihood: a continuation of {len(continuation)} tokens exceeds the "
                f"{self.max_length}-token window"
            )
        excess = len(context) + len(continuation) - 1 - self.max_length
        return context[excess:] if excess > 0 else context

    # --- data parallel ----------------------------------------------------------------------------

    def _init_distributed(self) -> None:
        """Under torchrun each process evaluates lm-eval's shard for its rank; rank 0 reports."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self._rank, self._world_size = 0, 1
        if world > 1:
            if not torch.distributed.is_initialized():
                backend = _backend()
                if backend == "nccl":
                    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                torch.distributed.init_process_group(backend)
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        staged = tensor.cpu() if torch.distributed.get_backend() == "gloo" else tensor
        parts = [torch.zeros_like(staged) for _ in range(self._world_size)]
        torch.distributed.all_gather(parts, staged)
        return torch.cat([p.reshape(-1) for p in parts]).to(tensor.device)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            torch.distributed.barrier()


class _BlockProgress:
    """Moves a bar over requests within one engine block: the block's `passes` passes of the
    engine's units make up its `done` requests, shown one short of them until its results are
    recorded (generation may stop before its last pass). Tokens/s counts the block's prompt
    `tokens` in the same shares, after the `counted` of earlier blocks since `start`."""

    def __init__(self, bar: tqdm, done: int, passes: int, counted: int, tokens: int, start: float) -> None:
        self.bar, self.done, self.passes = bar, done, passes
        self.floor, self.finished = bar.n, 0
        self.counted, self.tokens, self.start = counted, tokens, start

    def __call__(self, share: float) -> None:
        if share >= 1:
            self.finished, share = self.finished + 1, 0.0
        fraction = min((self.finished + share) / self.passes, 1.0)
        seen = self.counted + self.tokens * min(fraction * self.passes, 1.0)
        self.bar.set_postfix(tok_s=f"{seen / (time.perf_counter() - self.start):.0f}", refresh=False)
        shown = min(self.done * fraction, self.done - 0.51)  # shown rounded
        self.bar.update(self.floor + max(shown, 0) - self.bar.n)


def _hub_revision(pretrained: str, revision: str | None, trust_remote_code: bool | str) -> str:
    """`hf`'s model_args that mean something here: a hub checkpoint at a revision."""
    if str(trust_remote_code).lower() not in ("false", "0", "no"):
        raise FlexevalError(
            "flexgen: trust_remote_code=True is refused: flexeval runs no code from a model repository (its model "
            "families are its own code); drop it"
        )
    if revision is None:
        return pretrained
    if registry.check(pretrained) != "hub":
        raise FlexevalError(f"flexgen: revision={revision} chooses a version of a hub checkpoint; {pretrained} is none")
    return str(registry.download(pretrained, revision))


def _batch_size(batch_size: int | str | None, policy: str | Policy, policy_fields: dict[str, Any]) -> str | Policy:
    """lm-eval's batch size: a number sets gpu_batch_size, `auto` (or `auto:N`) is policy=auto."""
    text = str(batch_size) if batch_size is not None else ""
    if text.isdigit():
        if int(text) > 1:
            policy_fields.setdefault("gpu_batch_size", int(text))
        return policy
    if not text.startswith("auto"):
        if text:
            raise FlexevalError(f"flexgen: batch_size must be a number or auto, got {batch_size!r}")
        return policy
    if policy not in (AUTO, DEFAULT_POLICY):
        raise FlexevalError(
            f"flexgen: batch_size=auto is policy=auto (its search chooses blocks and placement together); with "
            f"policy={policy} give batch_size as a number"
        )
    return AUTO


def _check_model_args(policy_fields: dict[str, Any], score_through_cache: object) -> None:
    """lm-eval passes model_args as they were typed: a misspelt one is refused, naming the valid
    ones, rather than ignored (a run would evaluate something other than what was asked)."""
    unknown = sorted(set(policy_fields) - {f.name for f in fields(Policy)})
    if unknown:
        raise FlexevalError(
            f"flexgen: unknown model_args {unknown}; valid: pretrained, dtype, policy, offload_dir, compression, "
            "max_length, add_bos_token, seed, score_through_cache, calibration, revision, gpu_mem_gb, "
            "cpu_mem_gb, disk_gb, sequences, prompt_len, gen_len, and the Policy fields "
            f"{', '.join(f.name for f in fields(Policy))}"
        )
    if not isinstance(score_through_cache, bool):
        raise FlexevalError(f"flexgen: score_through_cache must be true or false, got {score_through_cache!r}")


def _policy_request(
    policy: str | Policy, policy_fields: dict[str, Any], budgets: dict[str, Any], workload: dict[str, Any]
) -> PolicyRequest:
    """The policy asked for, parsed as the Hydra app's options are. A policy made already (the
    Hydra app's) is its fields, with any given beside it over them: both paths then check alike."""
    if isinstance(policy, Policy):
        policy_fields = {f.name: getattr(policy, f.name) for f in fields(Policy)} | policy_fields
        return PolicyRequest.parse(None, policy_fields, budgets, workload, name="given")
    return PolicyRequest.parse(str(policy), policy_fields, budgets, workload, name=str(policy))


def _capped(policy: Policy, max_batch_size: int | str | None) -> Policy:
    if max_batch_size is None or policy.gpu_batch_size <= int(max_batch_size):
        return policy
    log.info("max_batch_size=%s caps gpu_batch_size %d", max_batch_size, policy.gpu_batch_size)
    return replace(policy, gpu_batch_size=int(max_batch_size))


def _device(device: str | None, world_size: int) -> str | None:
    """lm-eval's command line passes device=cuda:0 even on machines without CUDA: fall back.
    Under torchrun each process computes on its local rank's GPU, whatever device was named."""
    if device is not None and not device.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        if device is not None:
            log.warning("device=%s requested but CUDA is not available: running on the CPU", device)
        return "cpu" if device is not None else None
    if world_size > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


def _backend() -> str:
    """NCCL when every local process has a GPU of its own; otherwise gloo (CPU machines, or more
    processes than GPUs, which NCCL refuses), whose collectives then run on CPU copies."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local else "gloo"


def _sampling(kwargs: dict[str, Any], seed: int) -> dict[str, Any]:
    """lm-eval's generation kwargs as the engine's sampling arguments."""
    do_sample = kwargs.pop("do_sample", False)
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    top_k, top_p = kwargs.pop("top_k", 0) or 0, float(kwargs.pop("top_p", 1.0) or 1.0)
    unknown = sorted(set(kwargs) - {"num_beams"})
    if unknown or kwargs.get("num_beams", 1) != 1:
        raise FlexevalError(f"generation settings {sorted(kwargs)} are not supported by flexgen (no beam search)")
    if not do_sample:
        return {"seed": seed}
    sampling = {"temperature": temperature or 1.0, "top_k": top_k, "top_p": top_p, "seed": seed}
    Sampling(**sampling)  # checked for every group of requests before any of them runs
    return sampling
