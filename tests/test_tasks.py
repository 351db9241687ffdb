"""The task definitions in tasks/: they render the requests of lm-eval's built-in tasks, and every
one of them runs end to end with `hf` and with `flexgen` to the same metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import datasets
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from flexeval.data import TASKS_DIR, data_dir, local_tasks, task_manager
from flexeval.models import registry

MMLU_SUBJECT = "astronomy"
# local task -> (lm-eval's built-in task, the built-in's split -> our split, few-shot counts to compare).
# Our data lack some splits (no train anywhere, sciq has only validation): the built-in reads ours
# under its own split names, so both render the same rows. Few-shot prompts are compared where the
# built-in draws its examples from a different split than it scores, as ours do.
BUILTINS: dict[str, tuple[str, dict[str, str], tuple[int, ...]]] = {
    "hellaswag": ("hellaswag", {"validation": "validation"}, (0,)),
    "piqa": ("piqa", {"validation": "validation"}, (0,)),
    "arc_easy": ("arc_easy", {"train": "validation", "validation": "validation", "test": "test"}, (0, 5)),
    "lambada_openai": ("lambada_openai", {"test": "test"}, (0,)),
    "boolq": ("boolq", {"validation": "validation"}, (0,)),
    "openbookqa": ("openbookqa", {"train": "validation", "validation": "validation", "test": "test"}, (0, 5)),
    "sciq": ("sciq", {"validation": "validation", "test": "validation"}, (0,)),
    "wikitext": ("wikitext", {"test": "test"}, (0,)),
    "mmlu_local": (f"mmlu_{MMLU_SUBJECT}", {"test": "test", "dev": "dev"}, (0, 5)),
}
HELM = (
    "helm_synthetic_reasoning_pattern_match",
    "helm_synthetic_reasoning_variable_substitution",
    "helm_synthetic_reasoning_induction",
    "helm_xsum",
)


@pytest.fixture(scope="session")
def mmlu_files(tmp_path_factory) -> dict[str, str]:
    """MMLU-format files (question, subject, choices, answer) made from ARC-Easy's four-choice rows."""
    directory = tmp_path_factory.mktemp("mmlu")
    files = {}
    for split, source in (("test", "arc_easy_test.jsonl"), ("dev", "arc_easy_validation.jsonl")):
        rows = [json.loads(line) for line in (data_dir() / "arc_easy" / source).read_text().splitlines()]
        rows = [r for r in rows if r["choices"]["label"] == ["A", "B", "C", "D"]][:40]
        path = directory / f"mmlu_{split}.jsonl"
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "question": r["question"],
                        "subject": MMLU_SUBJECT,
                        "choices": r["choices"]["text"],
                        "answer": "ABCD".index(r["answerKey"]),
                    }
                )
                + "\n"
                for r in rows
            )
        )
        files[split] = str(path)
    return files


@pytest.fixture(scope="session")
def local(mmlu_files) -> TaskManager:
    return local_tasks({"mmlu_files": mmlu_files})


@pytest.fixture(scope="session")
def builtins() -> TaskManager:
    return TaskManager()


def requests(task: Any, num_fewshot: int, limit: int = 12) -> list[tuple]:
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(i.request_type, i.doc_id, i.idx, i.arguments) for i in task.instances]


def builtin_task(builtins: TaskManager, name: str, dataset: datasets.DatasetDict, scored: str) -> ConfigurableTask:
    """lm-eval's own definition of `name`, reading `dataset`; splits it names that our data
    lack are the split it scores (they only feed few-shot examples, which are not compared)."""
    config = load_yaml(builtins.task_index[name].yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if config.get(key) and config[key] not in dataset:
            dataset[config[key]] = dataset[scored]
    return ConfigurableTask(config=config | {"custom_dataset": lambda **_: dataset})


@pytest.mark.parametrize("name", BUILTINS)
def test_requests_equal_the_builtin_tasks(name: str, local: TaskManager, builtins: TaskManager) -> None:
    builtin, splits, shots = BUILTINS[name]
    ours = local.load([name])["tasks"][name]
    dataset = datasets.DatasetDict({b: ours.dataset[o] for b, o in splits.items()})
    theirs = builtin_task(builtins, builtin, dataset, ours.config.test_split or ours.config.validation_split)
    for num_fewshot in shots:
        rendered = requests(ours, num_fewshot)
        assert rendered and rendered == requests(theirs, num_fewshot), f"{name}, {num_fewshot}-shot"


def test_every_task_definition_is_compared() -> None:
    defined = {p.stem for p in TASKS_DIR.glob("*.yaml")}
    assert defined == set(BUILTINS) | set(HELM)


def test_lm_evals_own_tasks_are_chosen_beside_ours_without_notices_about_ours(caplog) -> None:
    assert task_manager(["piqa", "helm_lite", "commonsense"]).all_tasks == local_tasks().all_tasks  # ours alone
    with caplog.at_level("INFO"):
        manager = task_manager(["piqa", "arc_challenge"], {"data_dir": str(data_dir())})
        assert "arc_challenge" in manager.all_tasks
        tasks = manager.load(["piqa"])["tasks"]
    assert Path(tasks["piqa"].config.custom_dataset.__code__.co_filename).parent == TASKS_DIR  # ours took the name
    assert "overrides existing task" not in caplog.text and "Custom kwargs" not in caplog.text


def test_helm_scenarios_render_helm_prompts(local: TaskManager) -> None:
    context, settings = requests(local.load(["helm_xsum"])["tasks"]["helm_xsum"], 5, limit=1)[0][3]
    articles = [json.loads(line) for line in (data_dir() / "helm_xsum" / "xsum_test_1000.jsonl").open()][:101]
    shot = "###\nArticle: {}\n\nSummarize the above article in 1 sentence.\n"
    examples = [shot.format(a["document"]) + a["summary"] for a in articles[:5]]
    assert context == "\n\n".join([*examples, shot.format(articles[100]["document"])])
    assert settings == {"until": ["###"], "max_gen_toks": 64, "do_sample": False}
    name = "helm_synthetic_reasoning_pattern_match"
    context, settings = requests(local.load([name])["tasks"][name], 5, limit=1)[0][3]
    assert context.startswith("Please solve the following problem.\n\nRules: ") and context.endswith("\nTarget:")
    assert context.count("\nTarget:") == 6 and settings["until"] == ["\n"]


# --- end to end: hf and flexgen agree on every task ------------------------------------------------

LIMITS = {"wikitext": 2, "helm_xsum": 2, "lambada_openai": 10} | dict.fromkeys(HELM[:3], 4)


@pytest.fixture(scope="module")
def backends(smollm2_dir: Path) -> dict[str, Any]:
    from lm_eval.models.huggingface import HFLM

    from flexeval.lm import FlexGenLM

    return {
        "hf": HFLM(
            pretrained=str(smollm2_dir), dtype="float32", batch_size=8, device="cpu", **registry.hf_kwargs(smollm2_dir)
        ),
        "flexgen": FlexGenLM(pretrained=str(smollm2_dir), dtype="float32", gpu_batch_size=8, num_gpu_batches=2),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", [*BUILTINS, *HELM])
def test_hf_and_flexgen_agree(name: str, backends: dict[str, Any], local: TaskManager) -> None:
    import lm_eval

    out = {}
    for backend, lm in backends.items():
        task = local.load([name])["tasks"][name]
        out[backend] = lm_eval.simple_evaluate(
            model=lm, tasks=[task], limit=LIMITS.get(name, 6), bootstrap_iters=0, task_manager=local
        )
    hf, flexgen = (out[b]["results"][name] for b in ("hf", "flexgen"))
    metrics = [k for k, v in hf.items() if "," in k and "_stderr" not in k and isinstance(v, float)]
    assert metrics
    for key in metrics:
        assert math.isclose(flexgen[key], hf[key], abs_tol=1e-4), (key, flexgen[key], hf[key])
    if out["hf"]["configs"][name]["output_type"] == "generate_until":
        generated = [[s["resps"] for s in sorted(out[b]["samples"][name], key=lambda s: s["doc_id"])] for b in out]
        assert generated[0] == generated[1]
