"""Issue 23: what a user gives the planner is range-checked before any model loads, through either
front door, and a budget nothing fits is answered with the least raise that fits.

Profile figures, budgets and `max_length` reach the cost model, the linear program or the model;
a NaN, a zero rate or a length beyond the model's positions must fail in one line naming the
option as the user spelt it, not as a ZeroDivisionError, a solver's traceback or a plan with
negative tokens per second.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from flexeval import FlexevalError, Policy
from flexeval.engine.engine import Engine
from flexeval.lm import FlexGenLM
from flexeval.models import registry
from flexeval.planning import hardware
from flexeval.planning.cost_model import Workload
from flexeval.planning.request import PolicyRequest
from flexeval.planning.search import BUDGET_KEYS, Budget, search
from flexeval.resolve import resolve
from tests.helpers import WORKLOAD, compose_run, costs_for, machine

AUTO = ["model=tiny-llama", "policy=auto", *WORKLOAD]  # the workload given: nothing is counted


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Engine, "load", lambda *a, **k: pytest.fail("a model was loaded"))


def refused(call, expected: str) -> None:
    with pytest.raises(FlexevalError) as info:
        call()
    message = str(info.value)
    assert message.startswith(expected) and "\n" not in message, message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["+hardware.profile.disk_read=-1e9"], "hardware.profile.disk_read must be finite bytes per second above 0"),
        (["+hardware.profile.memory_bandwidth=0"], "hardware.profile.memory_bandwidth must be finite bytes per second"),
        (["+hardware.profile.dequantize=nan"], "hardware.profile.dequantize must be finite bytes per second above 0"),
        (["+hardware.profile.h2d=inf"], "hardware.profile.h2d must be finite bytes per second above 0, got inf"),
        (["+hardware.profile.op_seconds=-1"], "hardware.profile.op_seconds must be finite seconds, at least 0, got -1"),
        (
            ["+hardware.profile.read_slowdown=0.5"],
            "hardware.profile.read_slowdown must be a finite ratio of at least 1",
        ),
        (
            ["+hardware.profile.gemm={float32:[[1,0]]}"],
            "hardware.profile.gemm must be a map of dtypes to [rows, FLOP/s]",
        ),
        (["+hardware.profile.memory={disk:-1}"], "hardware.profile.memory must be a map of tiers (compute, cpu, disk)"),
        (["hardware.cpu_mem_gb=nan"], "hardware.cpu_mem_gb must be positive and finite (GB), got nan"),
        (["hardware.gpu_mem_gb=inf"], "hardware.gpu_mem_gb must be positive and finite (GB), got inf"),
        (
            ["hardware.disk_gb=nan"],
            "hardware.disk_gb must be finite and at least 0 (GB; 0 puts nothing on disk), got nan",
        ),
    ],
)
def test_the_app_refuses_unusable_profile_figures_and_budgets_by_their_option_names(
    overrides: list[str], expected: str, no_loading: None
) -> None:
    refused(lambda: resolve(compose_run(*AUTO, *overrides)), expected)


def test_the_backend_refuses_unusable_budgets_by_its_own_option_names(no_loading: None) -> None:
    for value in (float("nan"), "nan", "inf", 0, -1):
        refused(lambda v=value: FlexGenLM(pretrained="tiny-llama", cpu_mem_gb=v), "cpu_mem_gb must be positive")
    refused(lambda: FlexGenLM(pretrained="tiny-llama", policy="auto", disk_gb=True), "disk_gb must be a number of GB")
    refused(lambda: PolicyRequest.parse("auto", {}, {"gpu_mem_gb": "-inf"}, {}), "gpu_mem_gb must be positive")


def test_a_disk_budget_of_zero_puts_nothing_on_disk() -> None:
    """The one budget 0 means something for: a run that must not write the model to disk."""
    request = PolicyRequest.parse("disk-offload", {}, {"disk_gb": 0}, {})
    assert request.budget.disk == 0
    refused(lambda: request.fixed("tiny-llama", torch.float32), "policy disk-offload puts")
    costs = costs_for("tiny-llama", Workload(16, 64, 8))
    choice = search(costs, Policy(), Budget.from_gb(None, None, 0))
    assert choice.prediction.peak_bytes["disk"] == 0


def test_a_profile_override_is_checked_before_measuring_and_a_mapping_one_replaces_only_its_entries(
    tmp_path: Path,
) -> None:
    measured = []

    def measure(device: torch.device, offload: Path) -> hardware.HardwareProfile:
        measured.append(device)
        return machine()

    cpu, cache = torch.device("cpu"), tmp_path / "cache"
    refused(lambda: hardware.profile(cpu, tmp_path, cache, {"disk_write": 0}, measure), "hardware.profile.disk_write")
    assert not measured
    faster = ((1, 2e10), (4096, 2e11))
    profile = hardware.profile(cpu, tmp_path, cache, {"gemm": {"float32": faster}, "memory": {"disk": 0}}, measure)
    assert profile.gemm == {"float32": faster, "bfloat16": machine().gemm["bfloat16"]}
    assert profile.memory["disk"] == 0 and profile.memory["cpu"] > 0


def suggestions(message: str) -> list[dict[str, float]]:
    """Each budget an infeasibility error names, as GB per option: the first whole, then each
    alternative raise with the other given budgets as they were."""
    first = message.split("the smallest feasible budget is ")[1].split(" (")[0]
    named = {key: float(value) for key, value in re.findall(r"(\w+)=([\d.e+-]+)", first)}
    budgets = [named]
    for key, value in re.findall(r"(\w+) to ([\d.e+-]+)", message):
        given = dict(re.findall(r"(\w+)=([\d.e+-]+)", message.split(" for the ")[0]))
        budgets.append({k: float(v) for k, v in given.items()} | {key: float(value)})
    return budgets


def fits(costs, gigabytes: dict[str, float]) -> bool:
    try:
        search(costs, Policy(), Budget.from_gb(*(gigabytes.get(key) for key in BUDGET_KEYS.values())))
    except FlexevalError:
        return False
    return True


def test_an_infeasible_budget_names_the_least_single_raise_first_and_each_named_budget_fits() -> None:
    """A disk budget of 1 MB with small RAM budgets: the search once scaled every budget together
    until everything fit on disk, naming 25 GB of GPU memory where 0.42 GB of disk alone would do."""
    costs = costs_for(registry.DEFAULT_MODEL, Workload(20, 128, 0))
    given = {"gpu_mem_gb": 0.1, "cpu_mem_gb": 0.05, "disk_gb": 0.001}
    with pytest.raises(FlexevalError) as info:
        search(costs, Policy(), Budget.from_gb(*given.values()))
    named = suggestions(str(info.value))
    assert len(named) == 3  # each budget alone would do
    raised = [next(k for k in given if budget[k] > given[k]) for budget in named]
    assert sorted(raised) == sorted(given)
    assert all(sum(budget[k] > given[k] for k in given) == 1 for budget in named)  # one budget raised, the rest kept
    ratios = [budget[k] / given[k] for budget, k in zip(named, raised)]
    assert ratios == sorted(ratios)  # the smallest raise relative to its budget first
    assert all(fits(costs, budget) for budget in named)
    least = named[0] | {raised[0]: given[raised[0]] + 0.9 * (named[0][raised[0]] - given[raised[0]])}
    assert not fits(costs, least)  # and nine tenths of the first raise would not do


def test_a_raise_keeps_the_budgets_that_do_not_bind() -> None:
    """Working memory must be on the compute tier; the CPU budget need not grow for it."""
    costs = costs_for("tiny-llama", Workload(16, 64))
    for cpu in (1e-6, 1e-4):
        with pytest.raises(FlexevalError) as info:
            search(costs, Policy(), Budget.from_gb(1e-6, cpu, None))
        (named,) = suggestions(str(info.value))
        assert math.isclose(named["cpu_mem_gb"], cpu) and named["gpu_mem_gb"] > 0.01
        assert fits(costs, named)
    with pytest.raises(FlexevalError) as info:  # a zero budget is never divided by
        search(costs, Policy(), Budget.from_gb(0.02, 0.0001, 0))
    (named,) = suggestions(str(info.value))
    assert named["cpu_mem_gb"] == 0.0001 and named["disk_gb"] == 0 and fits(costs, named)


def test_max_length_is_checked_against_the_window_before_loading_in_both_doors(no_loading: None) -> None:
    window = registry.build_model(registry.resolve("tiny-llama")).context_length
    app = "model=tiny-llama"
    refused(lambda: resolve(compose_run(app, "model.max_length=-5")), "model.max_length must be at least 1, got -5")
    refused(
        lambda: resolve(compose_run(app, f"model.max_length={window + 1}")),
        f"model.max_length={window + 1} exceeds the model's context window of {window} tokens",
    )
    assert resolve(compose_run(app, f"model.max_length={window}")).config.model.max_length == window
    refused(lambda: FlexGenLM(pretrained="tiny-llama", max_length=-5), "max_length must be at least 1, got -5")
    refused(lambda: FlexGenLM(pretrained="tiny-llama", policy="auto", max_length="0"), "max_length must be at least 1")
    refused(
        lambda: FlexGenLM(pretrained="tiny-llama", policy="auto", max_length=100000),
        f"max_length=100000 exceeds the model's context window of {window} tokens",
    )
