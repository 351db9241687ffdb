"""Accuracy next to throughput: table rows from results.json files, tables, and the sweep plot.

    python -m flexeval.report DIR...            # every run under the directories, one table and plot
    python -m flexeval.report DIR... --out OUT  # written into OUT (default: the first DIR)

A row is one task of one run: its main metric (with stderr) and the others, then HELM-style
efficiency: requests, tokens processed, wall time, requests/s, tokens/s, peak memory per tier.
The plot puts accuracy against tokens/s, one labelled point per configuration, and marks the
Pareto front (no other configuration is both faster and more accurate).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from flexeval.atomic import atomic_file, write_text
from flexeval.errors import FlexevalError
from flexeval.models import dummy

log = logging.getLogger(__name__)
# The headline metric of a task: the first of these it reports.
PRIMARY = ("acc_norm", "acc", "exact_match", "rouge2", "word_perplexity", "perplexity")
MB = 2**20
# Overrides that choose what is measured or name a group: the rest tell configurations apart.
NOT_SETTINGS = ("task", "limit", "data_dir", "hydra", "model=", "policy=", "compression=", "hardware=")


@dataclass(frozen=True)
class Row:
    task: str
    metric: str
    value: float
    stderr: float | None
    higher_is_better: bool
    other_metrics: str
    requests: int
    prompt_tokens: int
    generated_tokens: int
    wall_seconds: float
    requests_per_second: float
    tokens_per_second: float
    peak_compute_mb: float
    peak_cpu_mb: float
    peak_disk_mb: float
    model: str
    policy: str
    compression: str
    settings: str  # the run's other command-line overrides (policy.gpu_batch_size=8, ...)
    run: str

    @property
    def configuration(self) -> dict[str, str]:
        return {"model": self.model, "policy": self.policy, "compression": self.compression, "settings": self.settings}


def rows(results: dict[str, Any], run: str) -> list[Row]:
    """One row per task of one run's results.json."""
    config = results["config"]
    pretrained = str(config["model"]["pretrained"])
    out = []
    for task, usage in results["throughput"].items():
        metrics = _metrics(results["results"][task], results["higher_is_better"].get(task, {}))
        if not metrics:
            continue
        name = next((m for m in PRIMARY if m in metrics), next(iter(metrics)))
        value, stderr, higher = metrics.pop(name)
        peak = usage["peak_bytes"]
        out.append(
            Row(
                task=task,
                metric=name,
                value=value,
                stderr=stderr,
                higher_is_better=higher,
                other_metrics="; ".join(f"{m} {_estimate(v, s)}" for m, (v, s, _) in metrics.items()),
                requests=usage["requests"],
                prompt_tokens=usage["prompt_tokens"],
                generated_tokens=usage["generated_tokens"],
                wall_seconds=usage["wall_seconds"],
                requests_per_second=usage["requests_per_second"],
                tokens_per_second=usage["tokens_per_second"],
                peak_compute_mb=peak.get("compute", 0) / MB,
                peak_cpu_mb=peak.get("cpu", 0) / MB,
                peak_disk_mb=peak.get("disk", 0) / MB,
                model=config["model"]["name"] + (" (dummy weights)" if pretrained.startswith(dummy.PREFIX) else ""),
                policy=config["policy"]["name"],
                compression=config["compression"]["name"],
                settings=" ".join(o for o in results.get("overrides", []) if not o.startswith(NOT_SETTINGS)),
                run=run,
            )
        )
    return out


def _metrics(result: dict[str, Any], higher: dict[str, bool]) -> dict[str, tuple[float, float | None, bool]]:
    """metric -> (value, stderr, higher is better), from lm-eval's "metric,filter" keys."""
    metrics = {}
    for key, value in result.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = result.get(f"{metric}_stderr,{filt}")
        metrics[metric] = (
            float(value),
            float(stderr) if isinstance(stderr, (int, float)) else None,
            higher.get(metric, True),
        )
    return metrics


def _estimate(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"


def load(directories: list[Path]) -> list[Row]:
    """The rows of every results.json under the directories (a run, a sweep, a date folder)."""
    found = []
    for directory in directories:
        if not directory.is_dir():
            raise FlexevalError(f"{directory} is not a directory of flexeval runs")
        found += sorted(directory.rglob("results.json"))
    if not found:
        raise FlexevalError(f"no results.json under {', '.join(map(str, directories))}: run python -m flexeval first")
    out = []
    for path in found:
        try:
            out += rows(json.loads(path.read_text()), str(path.parent.name))
        except (json.JSONDecodeError, KeyError) as err:
            log.warning("skipping %s: not a flexeval results file (%s)", path, err)
    return out


COLUMNS = (
    ("task", "task"),
    ("metric", "metric"),
    ("value", "value ± stderr"),
    ("other_metrics", "other metrics"),
    ("requests", "requests"),
    ("prompt_tokens", "prompt tok"),
    ("generated_tokens", "generated tok"),
    ("wall_seconds", "wall s"),
    ("requests_per_second", "req/s"),
    ("tokens_per_second", "tok/s"),
    ("peak_compute_mb", "peak compute MB"),
    ("peak_cpu_mb", "peak CPU MB"),
    ("peak_disk_mb", "peak disk MB"),
    ("model", "model"),
    ("policy", "policy"),
    ("compression", "compression"),
)


def markdown(table: list[Row]) -> str:
    def cell(row: Row, name: str) -> str:
        value = getattr(row, name)
        if name == "value":
            return _estimate(row.value, row.stderr)
        if isinstance(value, float):
            return f"{value:.1f}" if name != "requests_per_second" else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, name) for name, _ in COLUMNS) + " |" for row in table]
    return "\n".join(lines) + "\n"


def csv_text(table: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(Row)])
    writer.writeheader()
    writer.writerows(asdict(row) for row in table)
    return buffer.getvalue()


def write_tables(table: list[Row], directory: Path) -> None:
    write_text(directory / "table.md", markdown(table))
    write_text(directory / "table.csv", csv_text(table))


def pareto(points: list[Row]) -> list[Row]:
    """The rows no other row beats on both throughput and the metric, fastest first."""
    front, best = [], None
    for row in sorted(points, key=lambda r: (-r.tokens_per_second, -r.value if r.higher_is_better else r.value)):
        if best is None or (row.value > best if row.higher_is_better else row.value < best):
            front.append(row)
            best = row.value
    return front


def labels(table: list[Row]) -> dict[str, str]:
    """Run -> what tells its configuration apart from the others (all of it if nothing does)."""
    varying = [
        k for k in ("model", "policy", "compression", "settings") if len({r.configuration[k] for r in table}) > 1
    ]
    keys = varying or ["model", "policy", "compression"]
    return {r.run: " · ".join(r.configuration[k] for k in keys if r.configuration[k]) for r in table}


def plot(table: list[Row], path: Path) -> None:
    """Accuracy against tokens/s, one panel per task, one labelled point per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in table})
    names = labels(table)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        points = [r for r in table if r.task == task]
        front = pareto(points)
        for k, r in enumerate(sorted(points, key=lambda r: r.tokens_per_second)):
            on_front = r in front
            ax.errorbar(
                r.tokens_per_second,
                r.value,
                yerr=r.stderr,
                fmt="o" if on_front else "s",
                color="tab:red" if on_front else "tab:gray",
                capsize=3,
                label="Pareto front" if r is front[0] else ("dominated" if not on_front else None),
            )
            stagger = (6, 6 + 12 * (k % 3))  # neighbours' labels on different lines
            ax.annotate(names[r.run], (r.tokens_per_second, r.value), textcoords="offset points", xytext=stagger)
        ax.step(
            [r.tokens_per_second for r in front],
            [r.value for r in front],
            where="post",
            color="tab:red",
            linestyle="--",
        )
        ax.margins(x=0.25, y=0.15)
        ax.set_xlabel("throughput (tokens/s: prompt + generated, wall clock)")
        direction = "higher" if points[0].higher_is_better else "lower"
        ax.set_ylabel(f"{points[0].metric} ({direction} is better)")
        ax.set_title(f"{task}: accuracy vs throughput")
        ax.grid(alpha=0.3)
        handles, names_ = ax.get_legend_handles_labels()
        unique = dict(zip(names_, handles))
        ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_file(path) as scratch:
        fig.savefig(scratch, dpi=120, format="png", bbox_inches="tight")
    plt.close(fig)


def build(directories: list[Path], out: Path) -> list[Row]:
    """The combined table (markdown, CSV) and the plot of every run under `directories`."""
    table = load(directories)
    write_tables(table, out)
    plot(table, out / "accuracy_vs_throughput.png")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexeval.report", description=__doc__)
    parser.add_argument("directories", nargs="+", type=Path, help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, help="where to write table.md, table.csv and the plot")
    args = parser.parse_args(argv)
    out = args.out or args.directories[0]
    try:
        table = build(args.directories, out)
    except FlexevalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown(table))
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'accuracy_vs_throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
