"""The lm-eval backend `flexgen`: registration, parity with lm-eval's `hf` backend, shared
contexts, resumption from lm-eval's cache, data parallelism, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

import flexeval.lm
from flexeval import Engine, FlexevalError, FlexGenLM
from flexeval.data import TASKS_DIR, data_dir, local_tasks
from flexeval.models import registry
from flexeval.quantization.config import CompressionConfig

DATA = data_dir()


def request(kind: str, *args) -> Instance:
    return Instance(kind, {}, args, 0)


def jsonl(path: Path, limit: int) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line, _ in zip(f, range(limit))]


@pytest.fixture(scope="module")
def backends(smollm2_dir: Path):
    from lm_eval.models.huggingface import HFLM

    flexgen = FlexGenLM(pretrained=str(smollm2_dir), dtype="float32", gpu_batch_size=6, num_gpu_batches=2)
    hf = HFLM(
        pretrained=str(smollm2_dir), dtype="float32", batch_size=8, device="cpu", **registry.hf_kwargs(smollm2_dir)
    )
    return flexgen, hf


def test_flexgen_registers_with_its_module_and_hf_still_resolves() -> None:
    code = "import flexeval.lm; from lm_eval.api.registry import get_model; print(get_model('hf').__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "HFLM"
    assert get_model("flexgen") is FlexGenLM


@pytest.mark.slow
def test_loglikelihood_matches_hf(backends) -> None:
    """HellaSwag's endings share their document's context; flexgen computes it once per document."""
    flexgen, hf = backends
    requests = [
        request("loglikelihood", doc["ctx"], " " + ending)
        for doc in jsonl(DATA / "hellaswag" / "hellaswag_validation.jsonl", 6)
        for ending in doc["endings"]
    ]
    requests += [request("loglikelihood", "", "Paris is the capital of France.")]  # empty context: the prefix token
    ours, theirs = flexgen.loglikelihood(requests), hf.loglikelihood(requests)
    for (lp, greedy), (expected_lp, expected_greedy) in zip(ours, theirs):
        assert lp == pytest.approx(expected_lp, rel=1e-5, abs=1e-4) and greedy == expected_greedy


@pytest.mark.slow
def test_rolling_loglikelihood_matches_hf(backends) -> None:
    flexgen, hf = backends
    pages = sorted(
        (doc["page"] for doc in jsonl(DATA / "wikitext2" / "wikitext_document_level-2-raw-v1_test.jsonl", 62)), key=len
    )
    requests = [request("loglikelihood_rolling", page) for page in pages[:3]]
    for ours, theirs in zip(flexgen.loglikelihood_rolling(requests), hf.loglikelihood_rolling(requests)):
        assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.slow
def test_generate_until_matches_hf(backends) -> None:
    flexgen, hf = backends
    shots = jsonl(DATA / "helm_synthetic_reasoning" / "pattern_match_train.jsonl", 5)
    prefix = "Please solve the following problem.\n\n" + "".join(
        f"{d['input']}\nTarget: {d['target']}\n\n" for d in shots
    )
    docs = jsonl(DATA / "helm_synthetic_reasoning" / "pattern_match_test.jsonl", 6)
    kwargs = {"until": ["\n"], "max_gen_toks": 20, "do_sample": False}
    requests = [request("generate_until", prefix + d["input"] + "\nTarget:", kwargs) for d in docs]
    assert flexgen.generate_until(requests) == hf.generate_until(requests)


def test_shared_contexts_score_as_if_alone() -> None:
    engine = Engine.load("tiny-llama-gqa")
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, 250, (17,), generator=g)
    endings = [torch.randint(0, 250, (n,), generator=g) for n in (1, 5, 3, 9)]
    together = engine.score([(context, endings), (context[:4], endings[:2])])
    alone = [engine.score([(context, [e])])[0][0] for e in endings] + [
        engine.score([(context[:4], [e])])[0][0] for e in endings[:2]
    ]
    for ours, expected in zip(together[0] + together[1], alone):
        assert ours.logprob == pytest.approx(expected.logprob, abs=1e-5) and ours.greedy == expected.greedy
    whole = engine.logprobs([torch.cat((context, endings[2]))])[0][len(context) - 1 :]
    assert together[0][2].logprob == pytest.approx(float(whole.sum()), abs=1e-5)


def test_the_progress_bar_moves_within_a_block_once_per_unit(monkeypatch) -> None:
    shown: list[float] = []

    class Recording(flexeval.lm.tqdm):
        def update(self, n: float = 1) -> bool | None:
            done = super().update(n)
            shown.append(self.n)
            return done

    monkeypatch.setattr(flexeval.lm, "tqdm", Recording)
    lm = FlexGenLM(pretrained="tiny-llama", gpu_batch_size=8)  # one block
    requests = [Instance("loglikelihood", {}, (f"context {i}", " ending"), i) for i in range(6)]
    lm.loglikelihood(requests)
    units = len(lm.engine.plan)
    assert units >= len([layer for layer in lm.engine.model.layers if layer.block is not None])
    assert shown == pytest.approx([min(6 * (u + 1) / units, 6 - 0.51) for u in range(units)])  # one move a unit
    generated: list[float] = []
    lm.engine.on_unit = generated.append
    lm.engine.generate([[1, 2, 3]], 3)
    assert generated == [(u + 1) / units for u in range(units)] * 3  # the prefill and two decoding steps


def test_scoring_through_the_cache_gives_what_one_pass_gives() -> None:
    """`score_through_cache`: each continuation token read by a decoding step against the KV cache;
    with nothing approximated that is the same math, one query at a time."""
    g = torch.Generator().manual_seed(1)
    context = [int(t) for t in torch.randint(0, 250, (23,), generator=g)]
    token_requests = [
        (("", ""), context, [int(t) for t in torch.randint(0, 250, (n,), generator=g)]) for n in (1, 4, 7)
    ] + [(("", ""), context[:5], [9, 8, 7])]
    one_pass = FlexGenLM(pretrained="tiny-llama-gqa")._loglikelihood_tokens(token_requests)
    through = FlexGenLM(pretrained="tiny-llama-gqa", score_through_cache=True)
    assert through.score == through.engine.decode_score_blocks
    for (lp, greedy), (expected, expected_greedy) in zip(through._loglikelihood_tokens(token_requests), one_pass):
        assert lp == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy


def test_sampled_generation_is_seeded() -> None:
    kwargs = {"until": ["."], "max_gen_toks": 12, "do_sample": True, "temperature": 0.9, "top_p": 0.95}
    requests = [request("generate_until", prompt, kwargs) for prompt in ("Once upon a", "The sea")]
    first, again = (FlexGenLM(pretrained="tiny-llama", seed=3).generate_until(requests) for _ in range(2))
    other = FlexGenLM(pretrained="tiny-llama", seed=4).generate_until(requests)
    greedy = FlexGenLM(pretrained="tiny-llama").generate_until(
        [request("generate_until", "Once upon a", {"until": ["."], "max_gen_toks": 30})]
    )
    assert first == again and first != other and all("." not in text for text in first + greedy)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": "nan"}, "top_p"),
        ({"temperature": "inf"}, "temp"),
        ({"temperature": "abc"}, "generation settings"),
    ],
)
def test_bad_sampling_settings_are_refused_before_any_group_runs(setting, expected, monkeypatch) -> None:
    lm = FlexGenLM(pretrained="tiny-llama")
    monkeypatch.setattr(Engine, "generate", lambda *args, **kwargs: pytest.fail("computed before the check"))
    good = {"until": ["."], "max_gen_toks": 4}
    bad = good | {"do_sample": True} | setting
    with pytest.raises(FlexevalError, match=expected):
        lm.generate_until([request("generate_until", "Once", good), request("generate_until", "The sea", bad)])


@pytest.mark.parametrize("given", [{"w_gpu_percent": None}, {"attn_sparsity": None}, {"w_gpu_percent": True}])
def test_a_policy_field_of_no_value_or_a_bool_is_refused(given) -> None:
    (name,) = given
    with pytest.raises(FlexevalError, match=f"policy: {name} must be a"):
        FlexGenLM(pretrained="tiny-llama", **given)


def test_bad_model_args_are_named() -> None:
    with pytest.raises(FlexevalError, match=r"unknown model_args \['w_gpu'\].*w_gpu_percent"):
        FlexGenLM(pretrained="tiny-llama", w_gpu=10)
    with pytest.raises(FlexevalError, match="unknown preset 'fast'.*disk-offload"):
        FlexGenLM(pretrained="tiny-llama", policy="fast")
    with pytest.raises(FlexevalError, match="score_through_cache must be true or false, got 'yes'"):
        FlexGenLM(pretrained="tiny-llama", score_through_cache="yes")
    with pytest.raises(FlexevalError, match="overlap must be true or false"):
        FlexGenLM(pretrained="tiny-llama", overlap="maybe")
    with pytest.raises(FlexevalError, match="compression: unknown preset '2bit'; presets: none, 4bit-weights"):
        FlexGenLM(pretrained="tiny-llama", compression="2bit")
    with pytest.raises(FlexevalError, match=r"comp_weight_config takes bits:group_size:group_dim\[:fit\[:kernel\]\]"):
        FlexGenLM(pretrained="tiny-llama", compression="4bit-weights", comp_weight_config="4-64")


def test_compression_presets_and_fields_in_model_args() -> None:
    assert not FlexGenLM(pretrained="tiny-llama", compression=None).policy.compress_weight  # lm-eval's "none"
    lm = FlexGenLM(pretrained="tiny-llama", compression="8bit-weights", w_gpu_percent=0, w_cpu_percent=100)
    assert lm.policy.compress_weight and lm.policy.comp_weight_config == CompressionConfig(8, 64, 1)
    lm = FlexGenLM(pretrained="tiny-llama", compression="4bit-weights", comp_weight_config="3:32:1")
    assert lm.policy.comp_weight_config == CompressionConfig(3, 32, 1)


def test_long_contexts_are_cut_and_empty_continuations_are_certain(caplog) -> None:
    lm = FlexGenLM(pretrained="tiny-llama", max_length=16)
    context, continuation = list(range(3, 40)), [7, 8]
    requests = [(("a", "b"), context, continuation), (("a", ""), context, [])]
    (lp, _), empty = lm._loglikelihood_tokens(requests)
    assert empty == (0.0, True)
    expected = lm.engine.logprobs([context[-15:] + continuation])[0][-2:].sum()
    assert lp == pytest.approx(float(expected), abs=1e-5)
    assert "1 requests exceed the 16-token window" in caplog.text
    assert "1 requests have an empty continuation" in caplog.text


def test_simple_evaluate_runs_local_tasks() -> None:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="flexgen",
        model_args="pretrained=tiny-llama,policy=disk-offload",
        tasks=["piqa", "helm_synthetic_reasoning_pattern_match", "wikitext"],
        limit=4,
        task_manager=local_tasks(),
    )
    ran = out["config"]
    assert ran["model_device"] == "cpu" and ran["batch_sizes"] == [32] and ran["flexgen"]["block_size"] == 8 * 32
    assert ran["flexgen"]["throughput"]["requests"] > 0 and ran["flexgen"]["throughput"]["tokens_per_second"] > 0
    results = out["results"]
    assert 0 <= results["piqa"]["acc,none"] <= 1
    assert results["helm_synthetic_reasoning_pattern_match"]["exact_match,strip"] == 0  # a random model
    assert results["wikitext"]["word_perplexity,none"] > 1


def test_what_hf_model_args_mean_is_taken_and_the_rest_refused_with_a_reason() -> None:
    def create(args: str, batch_size: str | int = 1, max_batch_size: int | None = None) -> FlexGenLM:
        extra = {"batch_size": batch_size, "max_batch_size": max_batch_size, "device": None}
        return get_model("flexgen").create_from_arg_string(f"pretrained=tiny-llama,{args}", extra)

    lm = create("dtype=auto,trust_remote_code=False", batch_size="auto:4", max_batch_size=2)
    assert lm.choice is None and lm.dtype == torch.float32  # policy=auto plans when the requests arrive
    lm._loglikelihood_tokens([(("", ""), list(range(1, n)), [5, 6]) for n in (40, 20, 9)], disable_tqdm=True)
    assert lm.choice is not None and lm.policy.gpu_batch_size <= 2 and lm.engine.dtype == torch.float32
    assert create("policy=cpu-offload", batch_size=4).policy.gpu_batch_size == 4
    for args, batch_size, refusal in (
        ("trust_remote_code=True", 1, "trust_remote_code=True is refused: flexeval runs no code"),
        ("revision=main", 1, "revision=main chooses a version of a hub checkpoint; tiny-llama is none"),
        ("policy=disk-offload", "auto", "batch_size=auto is policy=auto"),
        ("dtype=auto", "large", "batch_size must be a number or auto"),
    ):
        with pytest.raises(FlexevalError, match=refusal):
            create(args, batch_size)


def lm_eval_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flexeval.lm_eval",
        "run",
        "--model",
        "flexgen",
        "--include_path",
        str(TASKS_DIR),
        *args,
    ]


def cached_rows(path: Path) -> int:
    try:
        with sqlite3.connect(path) as db:
            return db.execute("select count(*) from unnamed").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_killed_run_resumes_from_the_cache(tmp_path: Path) -> None:
    """SIGKILL midway; the rerun computes only what the cache lacks and ends with the same metrics."""
    cache = tmp_path / "cache"
    args = ["--model_args", "pretrained=tiny-llama,gpu_batch_size=2", "--tasks", "boolq", "--limit", "60"]
    run = lm_eval_command(*args, "--use_cache", str(cache), "--output_path", str(tmp_path / "out"))
    killed = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    db = Path(str(cache) + "_rank0.db")
    deadline = time.monotonic() + 120
    while cached_rows(db) < 20 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    done = cached_rows(db)
    assert 0 < done < 120, "the run was not caught midway"
    resumed = subprocess.run(run, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    cached, remaining = map(
        int, re.search(r"Cached requests: (\d+), Requests remaining: (\d+)", resumed.stderr).groups()
    )
    assert cached + remaining == 120 and cached >= done and remaining > 0
    fresh = subprocess.run(lm_eval_command(*args), capture_output=True, text=True)
    assert metrics(resumed.stdout) == metrics(fresh.stdout)


def metrics(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("|") and "acc" in line]


def test_data_parallel_ranks_give_the_metrics_of_one_process(tmp_path: Path) -> None:
    args = ["--model_args", "pretrained=tiny-llama", "--tasks", "boolq", "--limit", "200"]
    single = subprocess.run(lm_eval_command(*args), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    parallel = subprocess.run([*torchrun, *lm_eval_command(*args)[1:]], capture_output=True, text=True)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert metrics(parallel.stdout) == metrics(single.stdout) != []
