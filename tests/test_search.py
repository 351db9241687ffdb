"""The policy search (`flexeval.planning.search`, `policy=auto`) on a made-up machine: the fastest
policy its own model says fits, the least feasible budget named when none does, few linear
programs solved, the backend planning for the requests it gets, and measured RAM within budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexeval import FlexevalError, Policy
from flexeval.models import registry
from flexeval.models.tiny import WIDE_LLAMA, write
from flexeval.planning import search as search_module
from flexeval.planning.cost_model import Workload
from flexeval.planning.search import GB, Budget, search
from tests.helpers import costs_for


@pytest.mark.parametrize("share", [0.3, 0.5, 1.0, 2.0])
def test_the_search_returns_the_fastest_policy_it_predicts_within_the_budget(share: float):
    costs = costs_for(registry.DEFAULT_MODEL, Workload(64, 128, 8))
    weights = costs.model.nbytes(torch.float32)
    budget = Budget(compute=share * weights / 2, cpu=share * weights / 2)
    choice = search(costs, Policy(), budget)
    assert choice.prediction.peak_bytes["compute"] <= budget.compute
    assert choice.prediction.peak_bytes["cpu"] <= budget.cpu
    assert choice.prediction == costs.predict(choice.policy)
    for b in (1, 4, 16, 64):  # hand policies that fit are no faster
        for disk in (0, 50, 100):
            hand = Policy(gpu_batch_size=b, w_gpu_percent=(100 - disk) / 2, w_cpu_percent=(100 - disk) / 2)
            peaks = costs.predict(hand).peak_bytes
            if peaks["compute"] <= budget.compute and peaks["cpu"] <= budget.cpu:
                assert costs.predict(hand).seconds >= choice.prediction.seconds * 0.999


def test_an_infeasible_budget_names_the_smallest_feasible_one():
    """The named budget is where the leanest policy (one sequence at a time, everything on disk
    that can be) fits, and the search finds a policy there whatever it refused."""
    costs = costs_for("tiny-llama", Workload(16, 64))
    named = []
    for refused in (1000, 10_000, 100_000):
        with pytest.raises(FlexevalError, match="smallest feasible budget is gpu_mem_gb=") as raised:
            search(costs, Policy(), Budget(compute=refused, cpu=refused))
        assert "cpu_mem_gb=" in str(raised.value)
        named.append(float(str(raised.value).split("gpu_mem_gb=")[-1].split(",")[0]) * GB)
    choice = search(costs, Policy(), Budget(compute=named[0], cpu=named[0]))
    assert max(choice.prediction.peak_bytes["compute"], choice.prediction.peak_bytes["cpu"]) <= named[0]


def test_the_search_solves_each_shape_once_and_predicts_few_policies_exactly(monkeypatch):
    """What keeps the search fast (timed in benchmarks/policy_search.py): one linear program a
    batch shape, and re-solves and exact predictions only for the few best programs."""
    costs = costs_for(registry.DEFAULT_MODEL, Workload(1000, 512, 32))
    calls = {"programs": 0, "predictions": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(search_module, "linprog", counted("programs", search_module.linprog))
    monkeypatch.setattr(costs, "predict", counted("predictions", costs.predict))
    search(costs, Policy(), Budget(compute=0.25 * GB, cpu=0.25 * GB))
    shapes = len(search_module._shapes(costs))
    exact = search_module.ATTEMPTS + len(search_module.LEANEST)
    assert shapes <= calls["programs"] <= shapes + (search_module.RETRIES - 1) * exact
    assert 0 < calls["predictions"] <= search_module.RETRIES * exact


def test_the_least_budget_is_a_few_layers_not_the_model():
    """An offloading engine's floor: one sequence's working memory, a layer or two in flight and
    the head's vocabulary slices; a block's embedding reads only its own tokens' rows. SmolLM2's
    540 MB of fp32 weights run within 0.105 GB in all, 21 % of them."""
    costs = costs_for(registry.DEFAULT_MODEL, Workload(1000, 512, 0))
    for base in (Policy(), Policy(native_weights=True)):
        choice = search(costs, base, Budget.from_gb(0.085, 0.02, None))
        assert choice.policy.stream_unembedding and choice.policy.w_gpu_percent < 5
    with pytest.raises(FlexevalError, match="smallest feasible budget is gpu_mem_gb=0.0"):
        search(costs, Policy(), Budget.from_gb(0.04, 0.02, None))


def test_the_backend_plans_policy_auto_for_the_requests_lm_eval_hands_it():
    """As the Hydra app does, from the same parsed request (`flexeval.planning.request`): the backend
    cannot see the tasks when lm-eval makes it, so it plans when their requests arrive."""
    from lm_eval.api.instance import Instance

    from flexeval.lm import FlexGenLM

    lm = FlexGenLM(pretrained="tiny-llama", policy="auto", gpu_mem_gb="0.05", cpu_mem_gb="0.05")
    with pytest.raises(FlexevalError, match="loads the model once it has the requests to plan for"):
        lm.engine.close()
    # packed lengths 61, 31, 21 and 10 (a two-token ending's last token is only read): 31 on average
    lm._loglikelihood_tokens([(("", ""), list(range(1, n + 1)), [5, 6]) for n in (60, 30, 20, 9)], disable_tqdm=True)
    assert lm.policy == lm.choice.policy == lm.engine.policy
    assert lm.policy.gpu_batch_tokens == 31 * lm.policy.gpu_batch_size  # planned for these, not 512-token prompts
    assert lm.choice.prediction.peak_bytes["compute"] <= 0.05 * GB
    assert lm.policy.bound_heap  # a RAM budget on the CPU: glibc's heaps are trimmed after every unit
    assert lm.get_model_info()["flexgen"]["prediction"]["loglikelihood requests"]["seconds"] > 0
    # generation is planned anew (its KV cache must fit too), the model loaded again if the plan differs
    asked = [Instance("generate_until", {}, (f"prompt {i}", {"max_gen_toks": 5, "until": ["\n"]}), i) for i in range(3)]
    assert len(lm.generate_until(asked)) == 3
    assert set(lm.predictions) == {"loglikelihood requests", "generate_until requests"}
    assert lm.policy == lm.choice.policy and lm.choice.prediction.peak_bytes["compute"] <= 0.05 * GB
    lm.engine.close()
    given = FlexGenLM(pretrained="tiny-llama", policy="auto", sequences=8, prompt_len="64", gen_len=0)
    assert given.policy.gpu_batch_tokens == 64 * given.policy.gpu_batch_size  # planned, and loaded, at once
    given.engine.close()
    with pytest.raises(FlexevalError, match=r"policy all-resident puts .* GB of weights on the compute tier but"):
        FlexGenLM(pretrained="tiny-llama", policy="all-resident", gpu_mem_gb=0.0001)  # checked as the app checks
    with pytest.raises(FlexevalError, match="gpu_mem_gb must be a number of GB, got 'lots'"):
        FlexGenLM(pretrained="tiny-llama", policy="auto", gpu_mem_gb="lots")
    with pytest.raises(FlexevalError, match="prompt_len must be a whole number"):
        FlexGenLM(pretrained="tiny-llama", policy="auto", prompt_len="long")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("wide-llama")
    write(*WIDE_LLAMA, directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.1, 0.15, 0.25, 0.5, 1.0, 2.0])
def test_auto_policies_run_within_their_budget(share: float, wide_llama: Path, tmp_path: Path):
    """Issue 7's safety check: measured RAM peak within the budget + 10 %, or an error that names
    a budget that then runs."""
    weights = registry.build_model(wide_llama).nbytes(torch.float32)

    def run(budget: float) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "flexeval.auto_memory", str(wide_llama), str(budget), str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    outcome = run(share * weights)
    if "error" in outcome:
        assert "smallest feasible budget is gpu_mem_gb=" in outcome["error"]
        named = outcome["error"].split("gpu_mem_gb=")[-1]
        least = 2 * float(named.split(",")[0]) * GB
        assert least > share * weights
        outcome, share = run(least * 1.01), least * 1.01 / weights
        assert "error" not in outcome, outcome
    assert outcome["peak"] <= 1.1 * share * weights, outcome
