"""Broken data and task definitions are reported in one line naming what to fix (the variable and
path, the file and line and key), before any model loads, and never silently replaced by other
data: issue 23, "Nothing lost, nothing silently wrong"."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from lm_eval.tasks._yaml_loader import load_yaml

from flexeval import FlexevalError, data
from flexeval.data import TASKS_DIR, data_dir, local_tasks
from flexeval.evaluate import build_tasks
from flexeval.lm_eval import main as lm_eval_main
from flexeval.resolve import resolve
from tests.helpers import compose_run, flexeval

HELLASWAG = "hellaswag/hellaswag_validation.jsonl"
PIQA = "piqa/piqa_validation.jsonl"
Edit = Callable[[list[str]], str]  # the first 20 lines of a real file -> the broken file's text


def row(number: int, change: Callable[[dict], object]) -> Edit:
    """An edit of line `number` (1-based) as JSON: `change` alters the row in place."""

    def edit(lines: list[str]) -> str:
        parsed = json.loads(lines[number - 1])
        change(parsed)
        return "".join([*lines[: number - 1], json.dumps(parsed) + "\n", *lines[number:]])

    return edit


def broken(root: Path, relative: str, edit: Edit) -> Path:
    """A data directory under `root` holding the first 20 rows of one real file, edited."""
    target = root / relative
    target.parent.mkdir(parents=True)
    target.write_text(edit((data_dir() / relative).read_text().splitlines(keepends=True)[:20]))
    return root


@pytest.mark.parametrize(
    ("name", "relative", "edit", "expected"),
    [
        ("hellaswag", HELLASWAG, lambda lines: "", f"{HELLASWAG} is empty: "),
        (
            "hellaswag",
            HELLASWAG,
            lambda lines: "".join(lines[:12]) + lines[12][:90],
            rf"{HELLASWAG} line 13: not valid JSON \(Unterminated string .*\); the file looks cut short$",
        ),
        (
            "hellaswag",
            HELLASWAG,
            lambda lines: "".join([*lines[:11], lines[11].replace('", "', '" "', 1), *lines[12:]]),
            rf"{HELLASWAG} line 12: not valid JSON \(Expecting ',' delimiter: column \d+\)$",
        ),
        (
            "hellaswag",
            HELLASWAG,
            row(12, lambda r: r.pop("ctx_a")),
            rf"{HELLASWAG} line 12: ctx_a is missing or null \(this task reads activity_label, ctx_a,",
        ),
        (
            "hellaswag",
            HELLASWAG,
            row(12, lambda r: r.update(label="7")),
            rf"{HELLASWAG} line 12: label is '7', not one of '0', '1', '2', '3'$",
        ),
        ("hellaswag", HELLASWAG, row(3, lambda r: r["endings"].pop()), rf"{HELLASWAG} line 3: endings.3 is missing"),
        ("piqa", PIQA, row(4, lambda r: r.update(label=2)), rf"{PIQA} line 4: label is 2, not one of 0, 1$"),
        ("piqa", PIQA, row(4, lambda r: r.update(goal=None)), rf"{PIQA} line 4: goal is missing or null"),
        (
            "boolq",
            "boolq/super_glue_boolq_validation.jsonl",
            row(4, lambda r: r.update(label="yes")),
            r"boolq_validation.jsonl line 4: label is 'yes', not one of 0, 1$",
        ),
        (
            "arc_easy",
            "arc_easy/arc_easy_test.jsonl",
            row(5, lambda r: r.update(answerKey="Z")),
            r"arc_easy_test.jsonl line 5: answerKey is 'Z', not one of its choices.label \('A', 'B', 'C', 'D'\)$",
        ),
    ],
    ids=["empty", "cut-short", "not-json", "no-field", "label", "three-endings", "piqa-2", "null", "boolq", "arc"],
)
def test_a_broken_data_file_is_one_line_naming_the_file_and_the_line(
    name: str, relative: str, edit: Edit, expected: str, tmp_path: Path
) -> None:
    root = broken(tmp_path, relative, edit)
    if name == "arc_easy":  # its other split, sound
        shutil.copy(data_dir() / "arc_easy/arc_easy_validation.jsonl", root / "arc_easy")
    with pytest.raises(FlexevalError, match=expected) as raised:
        local_tasks({"data_dir": str(root)}).load([name])
    assert "\n" not in str(raised.value) and str(root) in str(raised.value)


def test_the_app_reports_a_broken_data_file_while_building_tasks_before_the_model(tmp_path: Path) -> None:
    root = broken(tmp_path, PIQA, row(4, lambda r: r.update(label=2)))
    run = resolve(compose_run("task=piqa", f"data_dir={root}"))
    with pytest.raises(FlexevalError, match=rf"^{root / PIQA} line 4: label is 2, not one of 0, 1$"):
        build_tasks(run.manager, run.tasks)


def test_every_task_declares_what_its_rows_must_hold() -> None:
    for path in TASKS_DIR.glob("*.yaml"):
        kwargs = load_yaml(path, resolve_func=False)["dataset_kwargs"]
        assert kwargs.get("fields"), f"{path.name}: dataset_kwargs.fields"


@pytest.mark.parametrize(
    ("overrides", "env", "expected"),
    [
        ((), "/no/such/dir", r"^\$FLEXEVAL_DATA_DIR /no/such/dir is not a directory: point \$FLEXEVAL_DATA_DIR at "),
        (("data_dir=/no/such/dir",), None, r"^data_dir /no/such/dir is not a directory: point data_dir at "),
    ],
    ids=["env", "data_dir"],
)
def test_a_data_directory_that_is_not_there_is_an_error_not_the_hub(
    overrides: tuple[str, ...], env: str | None, expected: str, monkeypatch
) -> None:
    monkeypatch.setenv(data.DATA_ENV, env or str(data_dir()))
    with pytest.raises(FlexevalError, match=expected):
        resolve(compose_run("task=hellaswag", *overrides))


def test_with_no_data_asked_for_or_found_lm_evals_tasks_run_with_a_notice(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path / "absent")
    assert resolve(compose_run("task.tasks=[hellaswag]")).data_dir is None
    assert "no benchmark data at" in caplog.text and "datasets from the Hugging Face hub" in caplog.text
    with pytest.raises(FlexevalError, match=r"^task helm_xsum reads local benchmark data, and there is none at "):
        resolve(compose_run("task.tasks=[hellaswag,helm_xsum]"))


def typo(root: Path, text: str) -> Path:
    """A copy of tasks/ whose piqa.yaml is `text` instead."""
    shutil.copytree(TASKS_DIR, root / "tasks")
    (root / "tasks" / "piqa.yaml").write_text(text)
    return root / "tasks"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("doc_to_text:", "doc_to_txt:"), r"piqa.yaml: unknown task key doc_to_txt \(did you mean doc_to_text\?\)$"),
        (("output_type: multiple_choice", "output_type: [multiple_choice"), r"piqa.yaml: not valid YAML \(.* line"),
        (("local_data.load", "local_data.laod"), r"piqa.yaml: Module '.*local_data.py' has no function 'laod'"),
    ],
    ids=["key", "syntax", "function"],
)
def test_a_task_definition_typo_is_one_line_naming_the_file_and_key(
    change: tuple[str, str], expected: str, monkeypatch, tmp_path: Path
) -> None:
    tasks = typo(tmp_path, (TASKS_DIR / "piqa.yaml").read_text().replace(*change))
    monkeypatch.setattr(data, "TASKS_DIR", tasks)
    with pytest.raises(FlexevalError, match=expected) as raised:  # the app's path
        resolve(compose_run("task=piqa"))
    assert "\n" not in str(raised.value)
    monkeypatch.setattr(sys, "argv", ["flexeval-lm-eval", "ls", "tasks", "--include_path", str(tasks)])
    with pytest.raises(SystemExit) as exited:  # a user's --include_path in flexeval-lm-eval
        lm_eval_main()
    assert exited.value.code == 2


@pytest.mark.parametrize("debug", [False, True])
def test_flexeval_lm_eval_prints_an_input_error_in_one_line_and_its_traceback_when_debugging(
    debug: bool, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv(data.DATA_ENV, "/no/such/dir")
    if debug:
        monkeypatch.setenv("FLEXEVAL_DEBUG", "1")
    result = flexeval(tmp_path, "--model", "flexgen", "--tasks", "hellaswag", "--limit", "1", module="flexeval.lm_eval")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        "error: $FLEXEVAL_DATA_DIR /no/such/dir is not a directory: "
        "point $FLEXEVAL_DATA_DIR at the benchmark JSONL folder"
    )
    assert ("Traceback" in result.stderr) is debug


def test_flexeval_lm_eval_checks_a_data_dir_in_its_metadata(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["flexeval-lm-eval", "--tasks", "hellaswag", "--metadata", "data_dir=/no/such"])
    with pytest.raises(SystemExit) as exited:
        lm_eval_main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: data_dir /no/such is not a directory")
