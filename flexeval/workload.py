"""The workload a run's tasks will ask of the engine, counted from their requests before the model
loads: what `policy=auto` plans for in the Hydra app (the `workload` section's values, when
given, override what is counted).

lm-eval builds every request before the model runs; building them here with the same documents,
limit and few-shot setting, and tokenizing them with the model's tokenizer, gives the sequences
the backend will run: one per distinct context (a multiple-choice document's endings pack into
its context's sequence), their lengths and the tokens they score, and for generation the
longest `max_gen_toks` asked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from flexeval.errors import FlexevalError
from flexeval.planning.cost_model import Workload

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerBase

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's, when a task names none
FEWSHOT_SEED = 1234  # lm-eval's default: the same few-shot examples as the run


def task_workload(
    manager: TaskManager,
    names: Iterable[str],
    limit: int | None,
    num_fewshot: int | None,
    tokenizer: PreTrainedTokenizerBase,
    window: int,
) -> Workload:
    """The tasks' requests as the backend will run them: a context and its endings packed into one
    sequence, each ending's last token read, not computed; contexts cut on the left where they
    would not fit the model's `window`, as the backend cuts them (beside each ending, which can
    part a context's endings into sequences of their own, or before the tokens to generate); a
    document scored whole (perplexity) in lm-eval's rolling windows of the window's size."""
    names = list(names)
    contexts: dict[str, list[str]] = {}
    room: dict[str, int] = {}  # a generation prompt's tokens at most
    rolling: set[str] = set()  # documents scored whole, in windows (perplexity)
    gen_len = 0
    for task in manager.load(names)["tasks"].values():
        if num_fewshot is not None:
            task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        for instance in task.instances:
            context, *rest = instance.arguments
            endings = contexts.setdefault(context, [])
            if instance.request_type == "loglikelihood":
                endings.append(rest[0])
            elif instance.request_type == "generate_until":
                asked = int(normalize_gen_kwargs(dict(rest[0]), DEFAULT_MAX_GEN_TOKS)["max_gen_toks"])
                gen_len = max(gen_len, asked)
                room[context] = min(room.get(context, window), window - asked)
            elif instance.request_type == "loglikelihood_rolling":
                rolling.add(context)
    if not contexts:
        raise FlexevalError(f"the tasks {', '.join(names)} build no requests: nothing to plan for")
    endings = [ending for group in contexts.values() for ending in group]
    ending_lengths = iter(_lengths(tokenizer, endings) if endings else [])
    lengths, scored, windows = [], [], 0
    for (context, group), n in zip(contexts.items(), _lengths(tokenizer, list(contexts))):
        if context in rolling:  # lm-eval's own windows over the document's tokens, one sequence each
            for kept, target in map(make_disjoint_window, get_rolling_token_windows(list(range(n)), 0, window, 1)):
                lengths.append(len(kept) + len(target) - 1)
                scored.append(len(target))
                windows += 1
            continue
        if not group:
            lengths.append(min(n, room.get(context, window)))
            scored.append(0)
            continue
        kept: dict[int, list[int]] = {}  # the context's tokens the backend keeps beside an ending -> those endings
        for ending in (next(ending_lengths) for _ in group):
            kept.setdefault(max(0, min(n, window + 1 - ending)), []).append(ending)
        for tokens, ends in kept.items():
            lengths.append(tokens + sum(e - 1 for e in ends))
            scored.append(sum(ends))
    return Workload.counted(lengths, gen_len, scored, len(endings) + windows)


def _lengths(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
