"""`flexeval.report`: table rows from results.json files, run labels, the Pareto front, the tables
(compact on screen, every column in table.md, long form in table.csv) and `python -m flexeval.report`."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flexeval import FlexevalError
from flexeval import evaluate as app
from flexeval.report import (
    Metric,
    Row,
    compact,
    csv_text,
    held_constant,
    labels,
    load,
    markdown,
    pareto,
    rows,
    run_labels,
    write_tables,
)
from flexeval.resolve import resolve
from tests.helpers import MB, compose_run, flexeval, run_dirs, table_rows

SETTINGS = ["model=tiny-llama", "task=piqa", "limit=8", "policy=disk-offload", "workload.gen_len=0", "+seed=3"]


def results(policy: str = "disk-offload", device: str = "cpu") -> dict[str, Any]:
    """A results.json as a run writes it: PIQA scored, BoolQ with no metric (so no row)."""
    usage = dict(requests=4, prompt_tokens=100, generated_tokens=8, wall_seconds=2.0, requests_per_second=2.0)
    usage |= {"tokens_per_second": 54.0, "peak_bytes": {"compute": 3 * MB, "cpu": 2 * MB, "disk": 5 * MB}}
    piqa = {
        "alias": "piqa",
        "acc,none": 0.6,
        "acc_stderr,none": 0.05,
        "acc_norm,none": 0.7,
        "acc_norm_stderr,none": 0.04,
    }
    return {
        "config": {
            "model": {"pretrained": "tiny-llama", "name": "tiny-llama"},
            "policy": {"name": policy},
            "compression": {"name": "none"},
        },
        "throughput": {"piqa": usage, "boolq": usage},
        "results": {"piqa": piqa, "boolq": {"alias": "boolq"}},
        "higher_is_better": {"piqa": {"acc": True, "acc_norm": True}},
        "overrides": SETTINGS,
        "hardware": {"device": device},
    }


def test_report_rebuilds_tables_and_plot_from_runs(sweep: Path, tmp_path: Path) -> None:
    result = flexeval(tmp_path, *map(str, run_dirs(sweep)), "--out", str(tmp_path), module="flexeval.report")
    assert result.returncode == 0, result.stderr[-3000:]
    assert table_rows(tmp_path / "table.csv") == table_rows(sweep / "table.csv")
    assert (tmp_path / "accuracy_vs_throughput.png").is_file()
    missing = flexeval(tmp_path, str(tmp_path / "nothing"), module="flexeval.report")
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and missing.stderr.count("\n") == 1


def row(run: str, value: float, speed: float, higher: bool = True, model: str = "m") -> Row:
    figures = dict.fromkeys(("wall_seconds", "requests_per_second", "peak_ram_mb", "peak_disk_mb"), 1.0)
    counts = dict(requests=1, prompt_tokens=1, generated_tokens=0)
    names = dict(task="piqa", model=model, compression="none", settings="")
    metric = Metric("acc" if higher else "perplexity", value, 0.01, higher)
    fixed = dict(peak_gpu_mb=None, policy=run, run=run)
    return Row(metrics=(metric,), tokens_per_second=speed, **fixed, **figures, **counts, **names)


def test_a_point_is_dominated_only_beyond_the_error_bars() -> None:
    rows = [row("a", 0.5, 100), row("b", 0.6, 50), row("c", 0.4, 80), row("d", 0.6, 40), row("e", 0.585, 60)]
    assert [r.run for r in pareto(rows)] == ["a", "e", "b", "d"]  # c: a is faster and better beyond both bars
    perplexity = [row("a", 30, 100, higher=False), row("b", 20, 50, higher=False), row("c", 40, 60, higher=False)]
    assert [r.run for r in pareto(perplexity)] == ["a", "b"]
    assert labels(rows) == {"a": "a", "b": "b", "c": "c", "d": "d", "e": "e"}  # only the policy differs
    assert held_constant(rows) == "model m, compression none"
    assert held_constant([row("a", 0.5, 1), row("b", 0.5, 2, model="n")]) == "compression none"


def test_the_tables_are_compact_on_screen_complete_in_files_and_long_in_csv() -> None:
    rows = [row("a", 0.5, 100), row("b", 0.6, 50)]
    assert compact(rows).splitlines()[0] == (
        "| task | metric | value ± stderr | tok/s | wall s | peak RAM MB | configuration |"
    )
    assert markdown(rows).splitlines()[0].count("|") == 17  # every column: 16
    gpu = replace(rows[0], peak_gpu_mb=5.0)
    assert "peak GPU MB" in compact([gpu]) and "peak GPU MB" not in compact(rows)
    lines = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert [(r["run"], r["metric"], r["value"], r["stderr"], r["headline"]) for r in lines] == [
        ("a", "acc", "0.5", "0.01", "True"),
        ("b", "acc", "0.6", "0.01", "True"),
    ]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], {"model": "tiny-llama", "policy": "all-resident", "compression": "none"}),
        (["compression.compress_weight=true"], {"compression": "none compress_weight=true"}),
        (["policy=disk-offload", "policy.gpu_batch_size=8"], {"policy": "disk-offload gpu_batch_size=8"}),
        (["model.pretrained=/models/x/my-model.gguf"], {"model": "my-model.gguf"}),
        (["model.pretrained=/m/a.gguf", "model.name=a", "model.max_length=64"], {"model": "a max_length=64"}),
    ],
)
def test_labels_name_what_ran(overrides: list[str], expected: dict[str, str]) -> None:
    config = compose_run("model=tiny-llama", *overrides)
    assert run_labels(config, overrides).items() >= expected.items()


def test_table_rows_of_sweep_points_tell_policy_overrides_apart(tmp_path: Path) -> None:
    made = []
    for size in (2, 4):
        overrides = ["model=tiny-llama", "task=piqa", "limit=2", f"policy.gpu_batch_size={size}"]
        out = tmp_path / str(size)
        made += rows(app.evaluate(resolve(compose_run(*overrides)), out, overrides), out.name)
    assert [row.policy for row in made] == ["all-resident gpu_batch_size=2", "all-resident gpu_batch_size=4"]


def test_a_row_heads_with_the_primary_metric_and_counts_memory_by_device() -> None:
    (row,) = rows(results(), "run-a")  # BoolQ reported no metric: no row
    assert row.task == "piqa" and row.run == "run-a"
    assert row.metrics == (Metric("acc_norm", 0.7, 0.04, True), Metric("acc", 0.6, 0.05, True))
    assert (row.model, row.policy, row.compression) == ("tiny-llama", "disk-offload", "none")
    assert row.settings == "workload.gen_len=0 +seed=3"  # what the groups and the task do not already say
    assert (row.peak_ram_mb, row.peak_gpu_mb, row.peak_disk_mb) == (5.0, None, 5.0)  # no GPU: compute tier is RAM
    (on_gpu,) = rows(results(device="cuda:0"), "run-b")
    assert (on_gpu.peak_ram_mb, on_gpu.peak_gpu_mb) == (2.0, 3.0)
    labelled = results() | {"labels": {"model": "m", "policy": "p gpu_batch_size=8", "compression": "c"}}
    (named,) = rows(labelled, "run-c")
    assert (named.model, named.policy, named.compression) == ("m", "p gpu_batch_size=8", "c")


def test_metrics_without_stderr_are_estimates_alone_and_lower_can_be_better() -> None:
    assert Metric("acc", 0.5, None, True).estimate() == "0.5000"
    assert Metric("acc", 0.5, 0.01234, True).estimate() == "0.5000 ± 0.0123"
    assert Metric("perplexity", 10.0, None, False).beats(Metric("perplexity", 11.0, None, False))
    assert not Metric("perplexity", 10.0, 0.6, False).beats(Metric("perplexity", 11.0, 0.5, False))


def test_load_reads_every_run_below_and_write_tables_writes_markdown_and_csv(tmp_path: Path, caplog) -> None:
    for run, policy in (("a", "disk-offload"), ("b", "cpu-offload")):
        (tmp_path / "sweep" / run).mkdir(parents=True)
        (tmp_path / "sweep" / run / "results.json").write_text(json.dumps(results(policy)))
    (tmp_path / "sweep" / "c").mkdir()
    (tmp_path / "sweep" / "c" / "results.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="flexeval.report"):
        table = load([tmp_path / "sweep"])
    assert [(r.run, r.policy) for r in table] == [("a", "disk-offload"), ("b", "cpu-offload")]
    assert "skipping" in caplog.text and "results.json: not a flexeval results file" in caplog.text

    write_tables(table, tmp_path)
    md = (tmp_path / "table.md").read_text().splitlines()
    assert md[0] == (
        "| task | metric | value ± stderr | other metrics | requests | prompt tok | generated tok | wall s | req/s "
        "| tok/s | peak RAM MB | peak disk MB | model | policy | compression | settings |"
    )
    assert md[1] == "|" + "---|" * 16 and len(md) == 4
    assert md[2] == (
        "| piqa | acc_norm | 0.7000 ± 0.0400 | acc 0.6000 ± 0.0500 | 4 | 100 | 8 | 2.0 | 2.00 | 54.0 | 5.0 | 5.0 "
        "| tiny-llama | disk-offload | none | workload.gen_len=0 +seed=3 |"
    )
    lines = table_rows(tmp_path / "table.csv")
    assert [(r["run"], r["metric"], r["value"], r["stderr"], r["headline"]) for r in lines] == [
        ("a", "acc_norm", "0.7", "0.04", "True"),
        ("a", "acc", "0.6", "0.05", "False"),
        ("b", "acc_norm", "0.7", "0.04", "True"),
        ("b", "acc", "0.6", "0.05", "False"),
    ]
    assert lines[0]["peak_gpu_mb"] == "" and lines[0]["peak_ram_mb"] == "5.0" and lines[2]["policy"] == "cpu-offload"

    with pytest.raises(FlexevalError, match="is not a directory of flexeval runs"):
        load([tmp_path / "nothing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlexevalError, match="no results.json under .*empty: run python -m flexeval first"):
        load([tmp_path / "empty"])


def test_labels_name_every_field_that_varies_and_all_of_them_when_none_does() -> None:
    a, b = row("a", 0.5, 10), replace(row("b", 0.5, 20), compression="4bit-weights")
    assert labels([a, b]) == {"a": "a · none", "b": "b · 4bit-weights"}
    assert held_constant([a, b]) == "model m"
    seeded = replace(row("a", 0.5, 10), run="a2", settings="+seed=3")
    assert labels([a, seeded]) == {"a": "", "a2": "+seed=3"}  # only the settings differ
    twin = replace(a, run="a3")
    assert labels([a, twin]) == {"a": "m · a · none", "a3": "m · a · none"}
    assert held_constant([a, twin]) == "model m, policy a, compression none"
