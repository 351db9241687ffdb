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

from flexeval.engine.cost_model import Workload
from flexeval.errors import FlexevalError

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
    """The tasks' requests as the backend will run them: contexts longer than the model's `window`
    are cut to it, as the backend cuts them."""
    names = list(names)
    contexts: dict[str, list[str]] = {}
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
                asked = normalize_gen_kwargs(dict(rest[0]), DEFAULT_MAX_GEN_TOKS)["max_gen_toks"]
                gen_len = max(gen_len, int(asked))
    if not contexts:
        raise FlexevalError(f"the tasks {', '.join(names)} build no requests: nothing to plan for")
    endings = [ending for group in contexts.values() for ending in group]
    ending_lengths = iter(_lengths(tokenizer, endings) if endings else [])
    # a context and its endings are one packed sequence; an ending's last token is read, not computed
    scored = [sum(next(ending_lengths) for _ in group) for group in contexts.values()]
    lengths = [
        min(n, window) + s - len(group)
        for n, s, group in zip(_lengths(tokenizer, list(contexts)), scored, contexts.values())
    ]
    return Workload.counted(lengths, gen_len, scored, len(endings))


def _lengths(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
