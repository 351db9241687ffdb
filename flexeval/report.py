"""Accuracy next to throughput: table rows from results.json files, tables, and the sweep plot.

    python -m flexeval.report DIR...            # every run under the directories, one table and plot
    python -m flexeval.report DIR... --out OUT  # written into OUT (default: the first DIR)

A row is one task of one run: its headline metric (with stderr) and the others, then HELM-style
efficiency: requests, tokens processed, wall time, requests/s, tokens/s, peak memory (RAM, the
GPU's when there is one, disk). What is printed is compact (task, metric, tokens/s, wall time,
peak memory); `table.md` holds every column and `table.csv` the same in long form, one line per
metric, every number in a column of its own. The plot puts each task's headline metric against
tokens/s, one labelled point per configuration with ±1 stderr bars, says what the points share,
and calls a point dominated only when another is at least as fast and better beyond both
points' error bars.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from dataclasses import dataclass, fields
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
NOT_SETTINGS = ("task", "limit", "data_dir", "hydra", "resume", "model", "policy", "compression", "hardware=")
CONFIGURATION = ("model", "policy", "compression", "settings")
LABELLED = ("model", "policy", "compression")  # groups whose label names the fields a run changed


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    stderr: float | None
    higher_is_better: bool

    def estimate(self) -> str:
        return f"{self.value:.4f}" if self.stderr is None else f"{self.value:.4f} ± {self.stderr:.4f}"

    def beats(self, other: Metric) -> bool:
        """Better than `other` beyond both error bars (a missing stderr counts as none)."""
        gap = (self.value - other.value) * (1 if self.higher_is_better else -1)
        return gap > (self.stderr or 0) + (other.stderr or 0)


@dataclass(frozen=True)
class Row:
    task: str
    metrics: tuple[Metric, ...]  # the headline first
    requests: int
    prompt_tokens: int
    generated_tokens: int
    wall_seconds: float
    requests_per_second: float
    tokens_per_second: float
    peak_ram_mb: float  # the engine's CPU RAM; on a machine without a GPU its compute tier too
    peak_gpu_mb: float | None  # None: the run had no GPU
    peak_disk_mb: float
    model: str
    policy: str
    compression: str
    settings: str  # the run's other command-line overrides (policy.gpu_batch_size=8, ...)
    run: str

    @property
    def headline(self) -> Metric:
        return self.metrics[0]

    @property
    def configuration(self) -> dict[str, str]:
        return {key: getattr(self, key) for key in CONFIGURATION}


def rows(results: dict[str, Any], run: str) -> list[Row]:
    """One row per task of one run's results.json."""
    config = results["config"]
    pretrained = str(config["model"]["pretrained"])
    on_gpu = str(results.get("hardware", {}).get("device", "cpu")).startswith("cuda")
    overrides = results.get("overrides", [])
    names = results.get("labels") or {group: config[group]["name"] for group in LABELLED}  # older results.json
    out = []
    for task, usage in results["throughput"].items():
        metrics = _metrics(results["results"][task], results["higher_is_better"].get(task, {}))
        if not metrics:
            continue
        headline = min(metrics, key=lambda m: PRIMARY.index(m.name) if m.name in PRIMARY else len(PRIMARY))
        peak = {tier: usage["peak_bytes"].get(tier, 0) / MB for tier in ("compute", "cpu", "disk")}
        out.append(
            Row(
                task=task,
                metrics=(headline, *(m for m in metrics if m is not headline)),
                requests=usage["requests"],
                prompt_tokens=usage["prompt_tokens"],
                generated_tokens=usage["generated_tokens"],
                wall_seconds=usage["wall_seconds"],
                requests_per_second=usage["requests_per_second"],
                tokens_per_second=usage["tokens_per_second"],
                peak_ram_mb=peak["cpu"] + (0 if on_gpu else peak["compute"]),
                peak_gpu_mb=peak["compute"] if on_gpu else None,
                peak_disk_mb=peak["disk"],
                model=names["model"] + (" (dummy weights)" if pretrained.startswith(dummy.PREFIX) else ""),
                policy=names["policy"],
                compression=names["compression"],
                settings=" ".join(o for o in overrides if not o.lstrip("+~").startswith(NOT_SETTINGS)),
                run=run,
            )
        )
    return out


def run_labels(config: Any, overrides: list[str]) -> dict[str, str]:
    """What ran, in a table's words: each group's preset and the fields the run changed in it, so
    that `compression=none compression.compress_weight=true` (4-bit weights) does not read "none",
    and the model the checkpoint a `model.pretrained=` override named."""
    changed: dict[str, list[str]] = {group: [] for group in LABELLED}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        group, dot, name = key.partition(".")
        if dot and group in changed:
            changed[group].append(f"{name}={value}")
    pretrained = str(config["model"]["pretrained"])
    if any(c.startswith("pretrained=") for c in changed["model"]) and not any(
        c.startswith("name=") for c in changed["model"]
    ):
        model = pretrained if pretrained.startswith(dummy.PREFIX) else Path(pretrained).name
    else:
        model = str(config["model"]["name"])
    bases = {"model": model} | {group: str(config[group]["name"]) for group in LABELLED if group != "model"}
    named = ("pretrained=", "name=")  # already in the model's base
    return {
        group: " ".join([bases[group], *(c for c in changed[group] if not (group == "model" and c.startswith(named)))])
        for group in LABELLED
    }


def _metrics(result: dict[str, Any], higher: dict[str, bool]) -> list[Metric]:
    """From lm-eval's "metric,filter" keys, in lm-eval's order."""
    metrics = []
    for key, value in result.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = result.get(f"{metric}_stderr,{filt}")
        error = float(stderr) if isinstance(stderr, (int, float)) else None
        metrics.append(Metric(metric, float(value), error, higher.get(metric, True)))
    return metrics


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


def _table(table: list[Row], columns: dict[str, Any]) -> str:
    """A markdown table: one column per (title, cell function)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell(row)) for cell in columns.values()) + " |" for row in table]
    return "\n".join(lines) + "\n"


def _memory(table: list[Row]) -> dict[str, Any]:
    columns = {"peak RAM MB": lambda r: f"{r.peak_ram_mb:.1f}"}
    if any(r.peak_gpu_mb is not None for r in table):
        columns["peak GPU MB"] = lambda r: "" if r.peak_gpu_mb is None else f"{r.peak_gpu_mb:.1f}"
    return columns


def compact(table: list[Row]) -> str:
    """What a terminal shows: task, headline metric, speed and memory (and, for several runs,
    what tells them apart)."""
    columns = {
        "task": lambda r: r.task,
        "metric": lambda r: r.headline.name,
        "value ± stderr": lambda r: r.headline.estimate(),
        "tok/s": lambda r: f"{r.tokens_per_second:.1f}",
        "wall s": lambda r: f"{r.wall_seconds:.1f}",
        **_memory(table),
    }
    if len({r.run for r in table}) > 1:
        names = labels(table)
        columns["configuration"] = lambda r: names[r.run]
    return _table(table, columns)


def markdown(table: list[Row]) -> str:
    """Every column (table.md)."""
    return _table(
        table,
        {
            "task": lambda r: r.task,
            "metric": lambda r: r.headline.name,
            "value ± stderr": lambda r: r.headline.estimate(),
            "other metrics": lambda r: "; ".join(f"{m.name} {m.estimate()}" for m in r.metrics[1:]),
            "requests": lambda r: r.requests,
            "prompt tok": lambda r: r.prompt_tokens,
            "generated tok": lambda r: r.generated_tokens,
            "wall s": lambda r: f"{r.wall_seconds:.1f}",
            "req/s": lambda r: f"{r.requests_per_second:.2f}",
            "tok/s": lambda r: f"{r.tokens_per_second:.1f}",
            **_memory(table),
            "peak disk MB": lambda r: f"{r.peak_disk_mb:.1f}",
            **{key: (lambda r, key=key: r.configuration[key]) for key in CONFIGURATION},
        },
    )


def csv_text(table: list[Row]) -> str:
    """Long form: one line per metric of each row, every number in its own column."""
    per_row = [f.name for f in fields(Row) if f.name != "metrics"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["task", "metric", "value", "stderr", "higher_is_better", "headline"])
    writer.fieldnames += [name for name in per_row if name not in writer.fieldnames]
    writer.writeheader()
    for row in table:
        shared = {name: getattr(row, name) for name in per_row}
        for metric in row.metrics:
            figures = {"value": metric.value, "stderr": metric.stderr, "higher_is_better": metric.higher_is_better}
            writer.writerow(shared | figures | {"metric": metric.name, "headline": metric is row.headline})
    return buffer.getvalue()


def write_tables(table: list[Row], directory: Path) -> None:
    write_text(directory / "table.md", markdown(table))
    write_text(directory / "table.csv", csv_text(table))


def pareto(points: list[Row]) -> list[Row]:
    """The rows that no other row dominates, fastest first: a row is dominated when another is at
    least as fast and its headline metric is better beyond both rows' error bars."""
    return sorted(
        (
            row
            for row in points
            if not any(
                other.tokens_per_second >= row.tokens_per_second and other.headline.beats(row.headline)
                for other in points
            )
        ),
        key=lambda r: -r.tokens_per_second,
    )


def labels(table: list[Row]) -> dict[str, str]:
    """Run -> what tells its configuration apart from the others (all of it if nothing does)."""
    keys = _varying(table) or ["model", "policy", "compression"]
    return {r.run: " · ".join(r.configuration[k] for k in keys if r.configuration[k]) for r in table}


def held_constant(table: list[Row]) -> str:
    """What every row shares, for the plot to say."""
    shared = [k for k in CONFIGURATION if k not in _varying(table) and table[0].configuration[k]]
    return ", ".join(f"{k} {table[0].configuration[k]}" for k in shared)


def _varying(table: list[Row]) -> list[str]:
    return [k for k in CONFIGURATION if len({r.configuration[k] for r in table}) > 1]


def plot(table: list[Row], path: Path) -> None:
    """Each task's headline metric against tokens/s, one panel per task, one labelled point per
    configuration with ±1 stderr bars; throughput from zero."""
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
                r.headline.value,
                yerr=r.headline.stderr,
                fmt="o" if on_front else "s",
                color="tab:red" if on_front else "tab:gray",
                capsize=3,
                label="not dominated" if on_front else "dominated: another is as fast and better beyond the bars",
            )
            stagger = (6, 6 + 12 * (k % 3))  # neighbours' labels on different lines
            ax.annotate(
                names[r.run], (r.tokens_per_second, r.headline.value), textcoords="offset points", xytext=stagger
            )
        ax.set_xlim(0, max(r.tokens_per_second for r in points) * 1.3)
        ax.margins(y=0.15)
        ax.set_xlabel("throughput (tokens/s: prompt + generated, wall clock)")
        direction = "higher" if points[0].headline.higher_is_better else "lower"
        ax.set_ylabel(f"{points[0].headline.name} ({direction} is better; bars: ±1 standard error)")
        ax.set_title(f"{task}: accuracy vs throughput")
        ax.grid(alpha=0.3)
        handles, names_ = ax.get_legend_handles_labels()
        unique = dict(zip(names_, handles))
        ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if constant := held_constant(table):
        fig.suptitle(f"held constant: {constant}", fontsize="medium")
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
    print(compact(table))
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'accuracy_vs_throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
