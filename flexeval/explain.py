"""`python -m flexeval.explain`: what the cost model predicts for a policy, next to what a run measured.

    python -m flexeval.explain policy=disk-offload workload.prompt_len=256   # a policy on this machine
    python -m flexeval.explain policy=auto hardware.gpu_mem_gb=0.3            # what the search would choose
    python -m flexeval.explain outputs/2026-11-26/12-00-00-hellaswag-...      # a run: predicted and measured

With Hydra overrides it composes the run configuration as `python -m flexeval` would and explains
its policy on the workload its tasks will run (counted from their requests; the `workload`
section's values over the count). With a run directory it explains the policy that ran on the
workload each task really was (each sequence's length, tokens scored and generated, from results.json)
and prints the measurements beside: seconds, compute, time waiting for I/O, throughput, and
the bytes each tier held at most. Predicted peaks add the compute tier's working memory, which
the tiers do not count.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from flexeval.errors import FlexevalError

USAGE = "usage: python -m flexeval.explain [RUN_DIR | hydra overrides such as policy=auto hardware.gpu_mem_gb=0.3]"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        runs = [Path(a) for a in args if Path(a).is_dir()]
        if runs:
            if len(args) != 1:
                raise FlexevalError(f"give one run directory and nothing else\n{USAGE}")
            print(explain_run(runs[0]))
        else:
            print(explain_config(args))
    except FlexevalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def explain_config(overrides: list[str]) -> str:
    from hydra import compose, initialize_config_dir

    from flexeval import config
    from flexeval.data import CONF_DIR
    from flexeval.planning.search import cost_model
    from flexeval.resolve import planned_workload, resolve

    config.check_choices(overrides)
    config.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config.CONFIG_NAME, overrides=overrides)
    run = resolve(cfg)
    costs = cost_model(
        cfg.model.pretrained,
        run.workload or planned_workload(cfg, run.manager),  # what policy=auto planned for, counted once
        cfg.model.dtype,
        run.device,
        cfg.hardware.offload_dir,
        profile_overrides=dict(cfg.hardware.profile),
    )
    return report(run.policy, costs.predict(run.policy), costs.workload, None)


def explain_run(directory: Path) -> str:
    from flexeval.engine.policy import Policy
    from flexeval.planning.cost_model import Workload
    from flexeval.planning.search import cost_model

    path = directory / "results.json"
    if not path.is_file():
        raise FlexevalError(f"{directory} has no results.json: give a run directory of python -m flexeval")
    results = json.loads(path.read_text())
    if "policy" not in results:
        raise FlexevalError(f"{path} records no policy (written by an older flexeval): rerun it to explain it")
    policy = Policy.from_dict({k: v for k, v in results["policy"].items() if k in {f.name for f in fields(Policy)}})
    cfg = results["config"]
    parts = []
    for task, usage in results["throughput"].items():
        sequences = max(1, usage.get("sequences", 0))
        gen_len = round(usage["generated_tokens"] / sequences)
        if usage.get("lengths"):  # the sequences as they ran: their lengths decide the micro-batches
            scored = usage.get("scored_tokens", 0)
            endings = 0 if gen_len else usage["requests"]
            workload = Workload.counted(usage["lengths"], gen_len, [scored] if scored else [], endings)
        else:  # written before flexeval recorded them: their mean
            workload = Workload(sequences, max(1, round(usage["prompt_tokens"] / sequences)), gen_len)
        costs = cost_model(
            cfg["model"]["pretrained"],
            workload,
            cfg["model"]["dtype"],
            results["hardware"]["device"],
            cfg["hardware"]["offload_dir"],
            profile_overrides=cfg["hardware"].get("profile") or None,
        )
        parts.append(f"## {task}\n" + report(policy, costs.predict(policy), workload, usage))
    return "\n\n".join(parts)


def report(policy: Any, predicted: Any, workload: Any, usage: dict[str, Any] | None) -> str:
    """The prediction's breakdown, and the run's measurements beside it when there are some."""
    from flexeval.planning.search import GB, Choice

    lines = [
        f"policy: {Choice(policy, predicted).summary()}",
        f"workload: {workload.sequences} sequences of {workload.prompt_len} tokens, {workload.gen_len} generated each",
        "",
        f"{'':<28}{'predicted':>12}{'measured':>12}",
    ]

    def row(name: str, value: float, measured: float | None = None, unit: str = "") -> None:
        seen = "" if measured is None else f"{measured:>12.3g}"
        lines.append(f"{name + unit:<28}{value:>12.3g}{seen}")

    measured = usage or {}
    row("seconds", predicted.seconds, measured.get("seconds"))
    row("tokens/s", predicted.tokens_per_second, _rate(measured, workload))
    row("compute seconds", predicted.prefill.compute + predicted.decode.compute, measured.get("compute_seconds"))
    for channel in predicted.prefill.io:
        busy = predicted.prefill.io[channel] + predicted.decode.io[channel]
        if busy:
            row(f"{channel} busy seconds", busy)
    if usage is not None:
        lines.append(f"{'waiting for I/O seconds':<28}{'':>12}{measured.get('io_wait_seconds', 0.0):>12.3g}")
    for name, stage in (("prefill", predicted.prefill), ("decode", predicted.decode)):
        if stage.seconds:
            row(f"{name} seconds", stage.seconds)
    for tier, nbytes in predicted.peak_bytes.items():
        held = measured.get("peak_bytes", {}).get(tier)
        row(f"peak {tier} GB", nbytes / GB, None if held is None else held / GB)
    return "\n".join(lines)


def _rate(usage: dict[str, Any], workload: Any) -> float | None:
    if not usage or not usage.get("seconds"):
        return None
    tokens = usage["generated_tokens"] if workload.gen_len else usage["prompt_tokens"]
    return tokens / usage["seconds"]


if __name__ == "__main__":
    sys.exit(main())
