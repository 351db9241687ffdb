"""The hardware profile, the cost model and the policy search (`policy=auto`).

Timing predictions are checked against measurements by `benchmarks/cost_model.py`; here the
profile is a fixed, made-up machine, so that what is tested is the arithmetic: caching of
measurements, the model's memory in the units the engine reports, and a search that never
returns a policy its own model says does not fit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flexeval import Engine, FlexevalError, Policy
from flexeval.engine.placement import weight_bytes_per_tier
from flexeval.engine.policy import compression_fields
from flexeval.models import registry
from flexeval.planning import hardware, timing
from flexeval.planning import search as search_module
from flexeval.planning.cost_model import TIERS, CostModel, Workload
from flexeval.planning.hardware import HardwareProfile, interpolate
from flexeval.planning.search import GB, Budget, search
from tests.auto_memory import write_wide_llama
from tests.conftest import same_results

MB = 2**20


def machine(**changes) -> HardwareProfile:
    """A made-up CPU-only machine: GEMMs ten times faster with many rows than with one."""
    rates = ((1, 1e10), (64, 5e10), (4096, 1e11))
    made = HardwareProfile(
        device="cpu",
        gemm={"float32": rates, "bfloat16": rates},
        attention={"float32": ((64, 2e10), (1024, 5e10)), "bfloat16": ((64, 2e10), (1024, 5e10))},
        decode_attention={"float32": 1e10, "bfloat16": 1e10},
        cpu_decode_attention={"float32": 1e10, "bfloat16": 1e10},
        memory_bandwidth=2e10,
        op_seconds=5e-6,
        dequantize=5e9,
        h2d=0.0,
        d2h=0.0,
        disk_read=1e9,
        disk_write=5e8,
        disk_call_seconds=1e-4,
        read_slowdown=1.2,
        memory={"compute": 16 * GB, "cpu": 16 * GB, "disk": 100 * GB},
    )
    return replace(made, **changes)


def layer_times(model, scale: float = 1.0, overhead: float = 2e-5) -> timing.LayerTimes:
    """What `measure_layers` would report on `machine()` if every layer took `scale` times its
    arithmetic plus `overhead` per call."""
    costs = CostModel(model, torch.float32, machine(), {}, Workload(1, 1))
    times = {}
    for kind in {layer.kind for layer in model.layers}:
        for phase, shapes in timing.LAYER_SHAPES.items():
            rows = []
            for b, n in shapes:
                seconds, calls = costs.arithmetic(kind, b, n, phase == "decode")
                rows.append((b, n, scale * seconds + overhead * calls))
            times[f"{kind}/{phase}"] = rows
    return times


def costs_for(spec: str, workload: Workload, **profile) -> CostModel:
    model = registry.build_model(registry.resolve(spec))
    return CostModel(model, torch.float32, machine(**profile), layer_times(model), workload)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-opt"])
def test_the_mlp_working_memory_is_counted_at_the_config_s_intermediate_size(spec: str):
    """Counted at the model's width instead, Qwen2.5-1.5B's MLP peak was undercounted 3-fold and
    `policy=auto` planned a run that a 1.5 GiB limit then killed."""
    config = json.loads((registry.resolve(spec) / "config.json").read_text())
    inner = config.get("intermediate_size") or config["ffn_dim"]
    costs = costs_for(spec, Workload(1, 8))
    assert costs.intermediate == inner
    assert costs.mlp_inner == (3 if spec == "tiny-llama" else 2) * inner


def test_interpolation_is_linear_in_log_size_and_flat_beyond_the_measured_sizes():
    table = ((1, 10.0), (100, 30.0))
    assert interpolate(table, 10) == pytest.approx(20.0)
    assert interpolate(table, 0.5) == 10.0 and interpolate(table, 10**6) == 30.0


def test_a_profile_is_measured_once_then_read_back_with_overrides_and_fresh_memory(tmp_path: Path):
    calls = []

    def measure(device, offload):
        calls.append(device)
        return machine()

    first = hardware.profile(torch.device("cpu"), tmp_path, tmp_path / "cache", measure=measure)
    again = hardware.profile(torch.device("cpu"), tmp_path, tmp_path / "cache", {"disk_read": 2e9}, measure=measure)
    assert len(calls) == 1
    assert again.disk_read == 2e9 and again.gemm == first.gemm
    assert again.memory["disk"] == hardware.available_memory(torch.device("cpu"), tmp_path)["disk"]
    (written,) = (tmp_path / "cache" / "hardware").glob("*.json")
    assert json.loads(written.read_text())["disk_read"] == machine().disk_read
    with pytest.raises(FlexevalError, match="unknown figures \\['disk_speed'\\]"):
        hardware.profile(torch.device("cpu"), tmp_path, tmp_path / "cache", {"disk_speed": 1}, measure=measure)


def test_a_damaged_profile_is_measured_again(tmp_path: Path):
    hardware.profile(torch.device("cpu"), tmp_path, tmp_path / "c", measure=lambda d, o: machine())
    (written,) = (tmp_path / "c" / "hardware").glob("*.json")
    written.write_text("{not json")
    again = hardware.profile(
        torch.device("cpu"), tmp_path, tmp_path / "c", measure=lambda d, o: machine(op_seconds=1.0)
    )
    assert again.op_seconds == 1.0


def test_the_fit_recovers_how_much_slower_the_layers_ran_than_their_arithmetic():
    model = registry.build_model(registry.resolve("tiny-llama"))
    costs = CostModel(model, torch.float32, machine(), layer_times(model, 1.7, 3e-5), Workload(8, 32))
    for scale, overhead in costs.fits.values():
        assert scale == pytest.approx(1.7, rel=1e-6) and overhead == pytest.approx(3e-5, rel=1e-6)


@pytest.mark.parametrize(
    "fields",
    [
        dict(w_gpu_percent=30, w_cpu_percent=30),
        dict(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=50),
        dict(w_gpu_percent=50, w_cpu_percent=0, **compression_fields("4bit")),
    ],
)
def test_predicted_bytes_are_what_the_engine_stores_on_each_tier(fields, tmp_path: Path):
    """Weights as `WeightStore` places them, and a block's whole KV cache, in `RunStats.tiers` units."""
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, **fields)
    workload = Workload(sequences=4, prompt_len=12, gen_len=5, uniform=True)
    costs = costs_for("tiny-llama", workload)
    engine = Engine.load("tiny-llama", policy=policy, offload_dir=tmp_path)
    engine.generate([list(range(1, 13))] * 4, max_new_tokens=5, stop_token_ids=[])
    held = {tier: 0 for tier in TIERS}
    for cls in ("weights", "cache"):
        for tier, figures in engine.stats.tiers[cls].items():
            held[tier] += figures["peak_bytes"]
    engine.close()
    stored = costs.weight_bytes(policy)
    assert stored == weight_bytes_per_tier(costs.model.layers, policy, torch.float32)
    cache = [costs.cache_bytes(policy) * share for share in policy.split("cache")]
    assert [held[t] for t in TIERS] == pytest.approx([w + c for w, c in zip(stored, cache)])


def test_more_on_disk_is_never_predicted_faster_and_overlap_hides_io():
    costs = costs_for("tiny-llama", Workload(64, 64, 16, uniform=True))
    seconds = [costs.predict(Policy(w_gpu_percent=100 - d, w_cpu_percent=0)).seconds for d in (0, 25, 50, 100)]
    assert seconds == sorted(seconds) and seconds[-1] > seconds[0]
    on_disk = Policy(w_gpu_percent=0, w_cpu_percent=0)
    assert costs.predict(on_disk).seconds < costs.predict(replace(on_disk, overlap=False)).seconds


def test_one_unit_per_block_keeps_the_disk_busy_beside_a_short_attention():
    """With overlap a unit's compute hides the next unit's read: apart, the MLP's long read waits
    beside the attention's short compute and the attention's short read idles beside the MLP's."""
    costs = costs_for(registry.DEFAULT_MODEL, Workload(32, 64, 16, uniform=True), disk_read=1e9)
    on_disk = Policy(gpu_batch_size=32, w_gpu_percent=0, w_cpu_percent=0)
    apart, together = costs.predict(on_disk), costs.predict(replace(on_disk, sep_layer=False))
    assert together.decode.seconds < 0.97 * apart.decode.seconds
    assert together.peak_bytes["compute"] > apart.peak_bytes["compute"]  # a whole block's weights staged
    assert {shape.sep_layer for shape in search_module._shapes(costs)} == {True, False}


def test_a_larger_block_reads_the_weights_fewer_times():
    # prompts long enough that even the small block's tokens touch every row of the token table
    costs = costs_for("tiny-llama", Workload(64, 128, 16, uniform=True), disk_read=1e6)
    small = costs.predict(Policy(gpu_batch_size=4, w_gpu_percent=0, w_cpu_percent=0))
    large = costs.predict(Policy(gpu_batch_size=4, num_gpu_batches=8, w_gpu_percent=0, w_cpu_percent=0))
    assert large.decode.io["disk"] == pytest.approx(small.decode.io["disk"] / 8)
    assert large.tokens_per_second > 4 * small.tokens_per_second


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


def test_the_cost_model_costs_the_micro_batches_the_backend_and_engine_run():
    """A task's sequences vary: the engine pads each micro-batch to its longest and caps its
    tokens, so a mean length mispredicted PIQA by up to 47 %. The cost model's blocks are the
    ones a run makes, and the largest of them sizes its memory."""
    from flexeval.lm import FlexGenLM

    lengths = [40, 33, 31, 30, 21, 20, 12, 9, 8, 5, 4]  # distinct: equal contexts would share a sequence
    lm = FlexGenLM("tiny-llama", gpu_batch_size=2, num_gpu_batches=2, gpu_batch_tokens=64)
    ran: Counter = Counter()
    cut = lm.engine._blocks

    def recorded(sizes):
        blocks = list(cut(sizes))
        ran.update(tuple((len(mb), max(sizes[i] for i in mb)) for mb in block) for block in blocks)
        return iter(blocks)

    lm.engine._blocks = recorded
    # a one-token continuation: the packed sequence is the context alone
    lm._loglikelihood_tokens([(("", ""), list(range(1, n + 1)), [7]) for n in lengths], disable_tqdm=True)
    costs = costs_for("tiny-llama", Workload(len(lengths), 20, lengths=tuple(lengths)))
    assert costs.shapes(lm.policy) == ran and costs.blocks(lm.policy) == sum(ran.values())
    widest = max(sum(rows * width for rows, width in block) for block in ran)
    assert costs.act_bytes(lm.policy) == widest * costs.width * 4  # fp32 hidden states
    lm.engine.close()
    mean = costs_for("tiny-llama", Workload(len(lengths), sum(lengths) // len(lengths)))
    assert mean.blocks(lm.policy) < costs.blocks(lm.policy)


def test_micro_batches_hold_at_most_gpu_batch_tokens_and_results_do_not_change():
    prompts = [list(range(1, n)) for n in (40, 30, 30, 20, 12, 8, 8, 4)]
    plain = Engine.load("tiny-llama", policy=Policy(gpu_batch_size=4))
    capped = Engine.load("tiny-llama", policy=Policy(gpu_batch_size=4, gpu_batch_tokens=64))
    lengths = {i: len(p) for i, p in enumerate(prompts)}
    sizes = [[len(mb) for mb in block] for block in capped._blocks(lengths)]
    assert sizes == [[1], [2], [3], [2]]  # 39 alone; 29 + 29; 19 + 11 + 7; 7 + 3
    assert all(len(mb) * max(lengths[i] for i in mb) <= 64 for block in capped._blocks(lengths) for mb in block)
    assert same_results(plain.logprobs(prompts), capped.logprobs(prompts))
    assert plain.generate(prompts, 4) == capped.generate(prompts, 4)
    with pytest.raises(FlexevalError, match="gpu_batch_tokens must be 0"):
        Policy(gpu_batch_tokens=-1)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("wide-llama")
    write_wide_llama(directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.1, 0.15, 0.25, 0.5, 1.0, 2.0])
def test_auto_policies_run_within_their_budget(share: float, wide_llama: Path, tmp_path: Path):
    """Issue 7's safety check: measured RAM peak within the budget + 10 %, or an error that names
    a budget that then runs."""
    weights = registry.build_model(wide_llama).nbytes(torch.float32)

    def run(budget: float) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "tests.auto_memory", str(wide_llama), str(budget), str(tmp_path)],
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
