"""`python -m flexeval` and its sweeps, run as a user runs them (`python -m flexeval.report`: test_report.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flexeval import FlexevalError, Policy, config
from flexeval.data import CONF_DIR, TASKS_DIR, data_dir, local_tasks
from flexeval.engine.policy import COMPRESSION_FIELDS, COMPRESSIONS, PRESETS, compression_fields
from flexeval.resolve import planned_workload, resolve
from tests.helpers import TINY, WORKLOAD, compose_run, flexeval, headline_rows, run_dirs, table_rows

RUN_FILES = ("results.json", "samples_piqa.jsonl", "table.md", "table.csv")


def test_a_run_writes_results_samples_and_tables(tmp_path: Path) -> None:
    result = flexeval(tmp_path, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| piqa | acc_norm |" in result.stdout and "tok/s" in result.stdout  # the final table
    (run,) = run_dirs(tmp_path / "outputs")
    assert run.name.endswith("-piqa-tiny-llama-all-resident-none")
    assert all((run / name).is_file() for name in RUN_FILES)
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["results"]["piqa"]["acc,none"] <= 1
    assert results["config"]["policy"]["gpu_batch_size"] == 32 and results["config"]["limit"] == 8
    assert results["hardware"]["cpu_count"] >= 1 and results["overrides"] == TINY
    usage = results["throughput"]["piqa"]
    assert usage["requests"] == 16 and usage["prompt_tokens"] > 0 and usage["wall_seconds"] > 0
    assert usage["peak_bytes"]["compute"] > 0
    samples = [json.loads(line) for line in (run / "samples_piqa.jsonl").read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == list(range(8))
    (row,) = headline_rows(run / "table.csv")
    assert row["task"] == "piqa" and row["metric"] == "acc_norm" and float(row["tokens_per_second"]) > 0
    lines = table_rows(run / "table.csv")
    assert sorted(r["metric"] for r in lines) == ["acc", "acc_norm"] and all(float(r["stderr"]) > 0 for r in lines)
    assert "peak RAM MB" in result.stdout and "GPU" not in result.stdout  # this machine has none
    assert not list(run.glob(".tmp-*"))  # atomic writes leave nothing behind


def test_a_sweep_writes_one_combined_table_and_plot(sweep: Path) -> None:
    assert len(run_dirs(sweep)) == 3
    rows = headline_rows(sweep / "table.csv")
    assert sorted(r["policy"] for r in rows) == ["all-resident", "cpu-offload", "disk-offload"]
    assert len({r["value"] for r in rows}) == 1  # placement changes speed, never results
    assert (sweep / "table.md").read_text().count("| piqa |") == 3
    assert (sweep / "accuracy_vs_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_with_an_infeasible_point_fails_before_any_point_runs(tmp_path: Path) -> None:
    budgets = "hardware.gpu_mem_gb=100,0.0000001"
    result = flexeval(tmp_path, "-m", *TINY, budgets, "policy=all-resident,cpu-offload")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: 1 of 4 sweep points cannot run; none was started"
    point = "model=tiny-llama task=piqa limit=8 hardware.gpu_mem_gb=1e-07 policy=all-resident"
    assert lines[-2].startswith(f"error: {point}: policy all-resident puts")
    assert not (tmp_path / "outputs").exists()


def test_a_point_failing_while_it_runs_is_recorded_and_the_others_run(tmp_path: Path) -> None:
    result = flexeval(tmp_path, "-m", *TINY, "model.max_length=256,8")  # endings longer than 8 tokens: found running
    assert result.returncode == 1, result.stderr[-3000:]
    (directory,) = (tmp_path / "outputs").glob("*/*-sweep")
    (failed,) = directory.rglob("failed.json")
    assert json.loads(failed.read_text())["error"].startswith("task piqa failed: loglikelihood: a continuation of")
    assert "failed: model=tiny-llama task=piqa limit=8 model.max_length=8: task piqa failed:" in result.stderr
    assert len(run_dirs(directory)) == 1 and len(headline_rows(directory / "table.csv")) == 1


def test_submitit_local_runs_each_configuration_as_its_own_job(tmp_path: Path) -> None:
    result = flexeval(tmp_path, "-m", "hydra/launcher=submitit_local", *TINY, "policy=all-resident,cpu-offload")
    assert result.returncode == 0, result.stderr[-3000:]
    (directory,) = (tmp_path / "outputs").glob("*/*-sweep")
    jobs = [p for p in (directory / ".submitit").iterdir() if list(p.glob("*_result.pkl"))]
    assert len(jobs) == 2 and len(run_dirs(directory)) == 2
    assert len(headline_rows(directory / "table.csv")) == 2


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["task=no_such_task"], "unknown task 'no_such_task': choose one of arc_easy, boolq, commonsense,"),
        (["model=gpt-5"], "unknown model 'gpt-5': choose one of llama-2-7b,"),
        (["policy=fast"], "unknown policy 'fast': choose one of all-resident, auto, cpu-offload, disk-offload"),
        (
            ["compression=2bit"],
            "unknown compression '2bit': choose one of 4bit, 4bit-cache, 4bit-weights, 4bit-weights-gptq, "
            "4bit-weights-input, 4bit-weights-int4mm, 8bit, ",
        ),
        (["-m", "policy=all-resident,cpu-offlaod"], "unknown policy 'cpu-offlaod'"),
    ],
)
def test_unknown_group_options_are_named_with_the_choices(overrides: list[str], expected: str) -> None:
    with pytest.raises(FlexevalError, match="^" + expected.replace("(", r"\(")):
        config.check_choices(overrides)


def test_help_and_unknown_options_answer_before_torch_or_lm_eval_load() -> None:
    code = (
        "import sys, flexeval.__main__ as m\n"
        "try:\n    m.config.check_choices(['policy=fast'])\nexcept m.FlexevalError:\n    pass\n"
        "print(sorted({'torch', 'lm_eval', 'transformers', 'scipy'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    result = subprocess.run([sys.executable, "-m", "flexeval", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "policy: all-resident, auto, cpu-offload, disk-offload" in result.stdout


def users_policy(root: Path) -> Path:
    """A user's own config folder holding policy/mine.yaml (cpu-offload under another name)."""
    (root / "policy").mkdir(parents=True)
    preset = (CONF_DIR / "policy" / "cpu-offload.yaml").read_text()
    (root / "policy" / "mine.yaml").write_text(preset.replace("name: cpu-offload", "name: mine"))
    return root


def test_a_users_config_dir_or_searchpath_adds_options(tmp_path: Path) -> None:
    mine = users_policy(tmp_path / "mine")
    config.check_choices(["--config-dir", str(mine), "policy=mine"])
    config.check_choices([f"hydra.searchpath=[file://{mine}]", "-m", "policy=mine,auto"])
    with pytest.raises(FlexevalError, match="^unknown policy 'mine': choose one of all-resident, auto, cpu-offload"):
        config.check_choices(["policy=mine"])
    with pytest.raises(FlexevalError, match="^unknown policy 'theirs': choose one of all-resident, auto, cpu-offload"):
        config.check_choices(["-cd", str(mine), "policy=theirs"])
    result = flexeval(tmp_path, "--config-dir", "mine", "policy=mine", *TINY[:2], "limit=2")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "outputs")
    assert json.loads((run / "results.json").read_text())["config"]["policy"]["name"] == "mine"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["limit=0"], "limit must be a positive number of documents per task, got 0"),
        (["data_dir=/no/such/dir"], "data_dir /no/such/dir is not a directory"),
        (["task.num_fewshot=-1"], "task.num_fewshot must be at least 0, got -1"),
        (["model.max_length=0"], "model.max_length must be at least 1, got 0"),
        (["model.pretrained=no-such-spec"], "unknown model spec 'no-such-spec'"),
        (["model.dtype=float64"], "unknown dtype 'float64'"),
        (["policy.w_gpu_percent=80", "policy.w_cpu_percent=50"], "policy: w_gpu_percent + w_cpu_percent = 130"),
        (["policy.gpu_batch_size=0"], "policy: gpu_batch_size must be a positive integer"),
        (["task.tasks=[piqa,no_such_task]"], "unknown task no_such_task: not in the task definitions in"),
        (["hardware.gpu_mem_gb=-1"], "hardware.gpu_mem_gb must be positive"),
        (["hardware.offload_dir=/no/such/dir"], "hardware.offload_dir /no/such/dir does not exist"),
        (
            ["compression=4bit-weights-gptq", "calibration.path=/no/such.jsonl"],
            "calibration.path /no/such.jsonl does not exist: the gptq fit needs text to fit to",
        ),
        (["compression=4bit-weights-gptq", "calibration.length=0"], "calibration: length must be a positive integer"),
        (["policy=auto", "workload.prompt_len=0"], "workload.prompt_len must be at least 1, got 0"),
        (["+hardware.profile.disk_speed=1"], "hardware.profile: unknown figures ['disk_speed']"),
        (
            ["model=tiny-llama", "policy=auto", "hardware.gpu_mem_gb=0.001", "hardware.cpu_mem_gb=0.001", *WORKLOAD],
            "no policy fits gpu_mem_gb=0.001, cpu_mem_gb=0.001 for the llama model, 512-token prompts: the smallest "
            "feasible budget is gpu_mem_gb=",
        ),
        (
            ["model=tiny-llama", "hardware.gpu_mem_gb=0.0001"],
            "policy all-resident puts 0.000429 GB of weights on the compute tier but hardware.gpu_mem_gb=0.0001: "
            "choose a policy with w_gpu_percent at most 23",
        ),
    ],
)
def test_bad_values_are_refused_in_one_line_before_any_model_loads(overrides, expected, monkeypatch) -> None:
    from flexeval.engine.engine import Engine

    monkeypatch.setattr(Engine, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(FlexevalError) as info:
        resolve(compose_run(*overrides))
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_the_command_line_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    for args in (["policy=fast"], ["limit=-3"]):
        result = flexeval(tmp_path, *args)
        assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr[-2000:]
        assert result.stderr.count("\n") == 1 and "flexgen" not in result.stderr
    assert not run_dirs(tmp_path)


def test_a_good_configuration_is_checked_into_a_run() -> None:
    run = resolve(compose_run("model=tiny-opt", "policy=disk-offload", "policy.gpu_batch_size=4", "limit=3"))
    assert run.policy == Policy.from_dict({"gpu_batch_size": 4}, preset="disk-offload")
    assert run.tasks == ("hellaswag",) and run.data_dir is not None
    assert run.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert run.calibration is None  # no gptq fit, no calibration text to check


def test_a_gptq_fit_finds_its_calibration_text_under_the_data_directory() -> None:
    run = resolve(compose_run("model=tiny-llama", "compression=4bit-weights-gptq", "calibration.sequences=8"))
    assert run.calibration.file == run.data_dir / "helm_xsum/xsum_test_1000.jsonl"
    assert run.calibration.file.is_file() and run.calibration.sequences == 8


def test_scoring_through_the_cache_reaches_the_backend(monkeypatch, tmp_path: Path) -> None:
    from flexeval import evaluate as app

    given = {}

    class Stop(Exception):
        pass

    def capture(**kwargs):
        given.update(kwargs)
        raise Stop

    monkeypatch.setattr(app, "FlexGenLM", capture)
    for overrides, expected in (((), False), (("score_through_cache=true",), True)):
        with pytest.raises(Stop):
            app.evaluate(resolve(compose_run("model=tiny-llama", "limit=2", *overrides)), tmp_path / str(expected))
        assert given["score_through_cache"] is expected


def test_lm_evals_own_tasks_are_accepted_beside_the_local_ones() -> None:
    assert resolve(compose_run("task.tasks=[piqa,arc_challenge]")).tasks == ("piqa", "arc_challenge")


def test_policy_files_are_the_presets_of_the_backend() -> None:
    """conf/policy/<preset>.yaml and `policy=<preset>` in lm-eval's model_args mean the same."""
    for preset in PRESETS:
        values = yaml.safe_load((CONF_DIR / "policy" / f"{preset}.yaml").read_text())
        assert values.pop("name") == preset
        assert Policy(**values) == Policy.from_dict({}, preset=preset)


def test_compression_files_are_the_presets_of_the_backend() -> None:
    """conf/compression/<preset>.yaml and `compression=<preset>` in lm-eval's model_args mean the same."""
    assert sorted(COMPRESSIONS) == config.group_options(["compression"])["compression"]
    for preset in COMPRESSIONS:
        values = yaml.safe_load((CONF_DIR / "compression" / f"{preset}.yaml").read_text())
        assert values.pop("name") == preset and set(values) == set(COMPRESSION_FIELDS)
        assert Policy.from_dict(values) == Policy.from_dict(compression_fields(preset))


def test_every_task_definition_has_a_task_option() -> None:
    options = {t for name in config.group_options(["task"])["task"] for t in compose_run(f"task={name}").task.tasks}
    defined = {yaml.safe_load(p.read_text().replace("!function", ""))["task"] for p in TASKS_DIR.glob("*.yaml")}
    assert defined <= options


def test_policy_auto_runs_the_searched_policy_records_it_and_explains_it(tmp_path: Path) -> None:
    budgets = ["hardware.gpu_mem_gb=0.05", "hardware.cpu_mem_gb=0.05", "workload.prompt_len=128"]
    result = flexeval(tmp_path, *TINY, "policy=auto", *budgets)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "policy=auto chose: gpu_batch_size=" in result.stdout
    (run,) = run_dirs(tmp_path / "outputs")
    results = json.loads((run / "results.json").read_text())
    chosen, prediction = results["policy"], results["prediction"]
    assert chosen["gpu_batch_tokens"] == chosen["gpu_batch_size"] * 128  # micro-batches hold what was planned
    assert prediction["peak_bytes"]["compute"] <= 0.05 * 2**30 and prediction["tokens_per_second"] > 0
    usage = results["throughput"]["piqa"]  # the sequences that ran, which explain costs again
    assert len(usage["lengths"]) == usage["sequences"] and sum(usage["lengths"]) == usage["prompt_tokens"]
    explained = flexeval(tmp_path, str(run), module="flexeval.explain")
    assert explained.returncode == 0, explained.stderr[-3000:]
    assert "## piqa" in explained.stdout and "tokens/s" in explained.stdout
    assert f"workload: {usage['sequences']} sequences of" in explained.stdout
    assert "waiting for I/O seconds" in explained.stdout  # the run's measurements beside the prediction


def test_policy_auto_plans_for_the_requests_the_tasks_will_make() -> None:
    import lm_eval

    from flexeval.lm import FlexGenLM

    tasks = local_tasks({"data_dir": str(data_dir())})
    counted = planned_workload(compose_run(*TINY, "policy=auto"), tasks)
    assert counted.continuations == 2 and counted.gen_len == 0  # PIQA: 2 endings a goal
    assert 0 < counted.scored < counted.prompt_len <= 256  # tiny-llama's window
    # 8 goals; one's endings cut its context differently to fit the window, so they are two sequences
    assert counted.sequences == 9
    lm = FlexGenLM("tiny-llama")
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"], limit=8, task_manager=tasks, bootstrap_iters=0)
    assert (lm.usage.sequences, lm.usage.prompt_tokens) == (counted.sequences, sum(counted.lengths))  # what ran
    perplexity = planned_workload(compose_run("model=tiny-llama", "task=wikitext", "limit=2", "policy=auto"), tasks)
    lm = FlexGenLM("tiny-llama")
    lm_eval.simple_evaluate(model=lm, tasks=["wikitext"], limit=2, task_manager=tasks, bootstrap_iters=0)
    assert perplexity.sequences == lm.usage.sequences > 2  # lm-eval's rolling windows of each document, counted
    generating = compose_run("model=tiny-llama", "task=helm_xsum", "limit=3", "policy=auto", "workload.sequences=7")
    workload = planned_workload(generating, local_tasks({"data_dir": str(data_dir())}))
    assert workload.sequences == 7 and workload.gen_len > 0 and workload.scored is None


def test_explain_predicts_a_policy_from_the_run_configuration(tmp_path: Path) -> None:
    result = flexeval(tmp_path, *TINY, "policy=disk-offload", "workload.gen_len=16", module="flexeval.explain")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "workload: 9 sequences of" in result.stdout and "16 generated each" in result.stdout  # counted, then given
    assert "gpu_batch_size=32 num_gpu_batches=8" in result.stdout and "disk busy seconds" in result.stdout
    assert "decode seconds" in result.stdout and "peak disk GB" in result.stdout
    bad = flexeval(tmp_path, "policy=fast", module="flexeval.explain")
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown policy 'fast'")
