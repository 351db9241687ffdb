"""The Engine API refuses what it cannot mean, and a run whose numbers stop being finite stops.

Bad arguments get one `FlexevalError` line before any compute; a closed engine refuses every
call; NaN or infinite weights are refused at load, naming the checkpoint tensor, and values that
stop being finite while the engine runs (an offload file overwritten, activations overflowing)
end the call with an error naming the layer where they first appear.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flexeval import Engine, FlexevalError, Policy
from flexeval.models import checkpoint
from tests.helpers import TINY_MODELS

ON_DISK = Policy(w_gpu_percent=0, w_cpu_percent=0)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load("tiny-llama")


def one_line_error(call) -> str:
    with pytest.raises(FlexevalError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def damage(directory: Path, name: str, value: float) -> None:
    """Set every value of one checkpoint tensor of `directory` to `value`."""
    state = load_file(directory / "model.safetensors")
    state[name] = torch.full_like(state[name], value)
    save_file(state, directory / "model.safetensors")


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda e: e.logprobs([1, 2, 3]), "wrap it: [[1, 2, 3]]"),
        (lambda e: e.generate([1, 2, 3]), "wrap it: [[1, 2, 3]]"),
        (lambda e: e.decode_logprobs([1, 2], [[3]]), "wrap it: [[1, 2, 3]]"),
        (lambda e: e.score([([1, 2], [3, 4])]), "wrap it: [[1, 2, 3]]"),
        (lambda e: e.logprobs([[1, 2], 3]), "sequence 1 is an int"),
        (lambda e: e.logprobs([[1.7, 2.0]]), "float 1.7 at position 0"),
        (lambda e: e.logprobs([[True, False]]), "bool True at position 0"),
        (lambda e: e.logprobs([[1, True]]), "bool True at position 1"),
        (lambda e: e.logprobs([[1, None]]), "NoneType None at position 1"),
        (lambda e: e.logprobs([torch.tensor([1.5, 2.0])]), "sequence 0 holds torch.float32"),
        (lambda e: e.logprobs([torch.tensor([True, False])]), "sequence 0 holds torch.bool"),
        (lambda e: e.logprobs([np.array([1.5, 2.0])]), "sequence 0 holds float64"),
        (lambda e: e.logprobs([torch.tensor([[1, 2, 3], [4, 5, 6]])]), "sequence 0 is a 2-D tensor"),
        (lambda e: e.logprobs([[1, 2**70]]), "outside the vocabulary"),
        (lambda e: e.logprobs(["hello"]), "sequence 0 is a str: tokenize text first"),
        (lambda e: e.score([("hello", [[3, 4]])]), "is a str: tokenize text first"),
        (lambda e: e.generate("hello"), "got str"),
        (lambda e: e.generate([[1, 2]], max_new_tokens=2.5), "max_new_tokens must be"),
        (lambda e: e.generate([[1, 2]], max_new_tokens=True), "max_new_tokens must be"),
        (lambda e: e.generate([[1, 2]], max_new_tokens="3"), "max_new_tokens must be"),
        (lambda e: e.generate([[1], [2]], max_new_tokens=[1, 1.5]), "max_new_tokens must be"),
        (lambda e: e.generate([[1], [2]], max_new_tokens=[1, None]), "max_new_tokens must be"),
        (lambda e: e.generate([[1, 2]], max_new_tokens=2**70), "context window is 256 tokens"),
        (lambda e: e.generate([[1, 2]], stop_strings="France"), "stop_strings must be a list of strings"),
        (lambda e: e.generate([[1, 2]], stop_strings=[1]), "stop_strings must be a list of strings"),
        (lambda e: e.generate([[1, 2]], stop_token_ids=5), "stop_token_ids must be a list of token ids"),
        (lambda e: e.generate([[1, 2]], stop_token_ids=[1.5]), "stop_token_ids must be a list of token ids"),
        (lambda e: e.generate([[1, 2]], stop_token_ids=[True]), "stop_token_ids must be a list of token ids"),
        (lambda e: e.generate([[1, 2]], stop_token_ids=[10**6]), "stop_token_ids has ids outside the vocabulary"),
        (lambda e: e.generate([[1, 2]], temperature=1.0, seed="1"), "seed must be an int"),
        (lambda e: e.generate([[1, 2]], temperature=1.0, seed=2**70), "seed must be an int"),
        (lambda e: e.generate([[1, 2]], temperature=math.nan), "temperature must be a finite number"),
        (lambda e: e.generate([[1, 2]], temperature=math.inf), "temperature must be a finite number"),
        (lambda e: e.generate([[1, 2]], temperature="1"), "temperature must be a finite number"),
        (lambda e: e.generate([[1, 2]], temperature=1.0, top_p=math.nan), "top_p must be a finite number"),
        (lambda e: e.generate([[1, 2]], temperature=1.0, top_p="0.5"), "top_p must be a finite number"),
        (lambda e: e.generate([[1, 2]], temperature=1.0, top_k=1.5), "top_k must be an int"),
        (lambda e: e.generate([[1, 2]], temperature=1.0, top_k=True), "top_k must be an int"),
    ],
)
def test_bad_arguments_are_refused_in_one_line_before_any_compute(engine: Engine, monkeypatch, call, expected) -> None:
    monkeypatch.setattr(engine, "_pass", lambda *args, **kwargs: pytest.fail("computed before refusing"))
    assert expected in one_line_error(lambda: call(engine))


def test_integer_ids_of_every_kind_are_still_taken(engine: Engine) -> None:
    expected = engine.logprobs([[1, 2, 3]])[0]
    for seq in ([np.int64(1), np.int32(2), 3], np.array([1, 2, 3]), torch.tensor([1, 2, 3], dtype=torch.int32)):
        assert torch.equal(engine.logprobs([seq])[0], expected)
    assert len(engine.generate([[1, 2]], max_new_tokens=np.int64(3), stop_token_ids=(), stop_strings=())[0]) == 3


@pytest.mark.parametrize("policy", [Policy(), ON_DISK], ids=["resident", "disk"])
def test_a_closed_engine_refuses_every_call(policy: Policy, tmp_path: Path) -> None:
    engine = Engine.load("tiny-llama", policy=policy, offload_dir=tmp_path)
    engine.close()
    engine.close()  # closing twice is harmless
    calls = [
        lambda: engine.logprobs([[1, 2, 3]]),
        lambda: engine.score([([1, 2], [[3]])]),
        lambda: engine.generate([[1, 2]], max_new_tokens=2),
        lambda: engine.decode_logprobs([[1, 2]], [[3]]),
        lambda: engine.decode_score([([1, 2], [[3]])]),
    ]
    for call in calls:
        assert one_line_error(call) == "this engine is closed: load it again"


@pytest.mark.parametrize(
    "tensor, value, slice_bytes",
    [
        ("model.layers.1.mlp.down_proj.weight", math.nan, checkpoint.SLICE_BYTES),
        ("model.layers.0.self_attn.v_proj.weight", math.inf, checkpoint.SLICE_BYTES),  # fused with q and k
        ("lm_head.weight", math.nan, 0),  # read a slice at a time onto disk (`Lazy`)
    ],
)
def test_non_finite_checkpoint_weights_are_refused_at_load_naming_the_tensor(
    tiny_dir: Path, tmp_path: Path, monkeypatch, tensor: str, value: float, slice_bytes: int
) -> None:
    monkeypatch.setattr(checkpoint, "SLICE_BYTES", slice_bytes)
    damage(tiny_dir, tensor, value)
    for policy in (Policy(), ON_DISK):
        message = one_line_error(lambda policy=policy: Engine.load(tiny_dir, policy=policy, offload_dir=tmp_path))
        assert f"tensor '{tensor}'" in message and "re-download or re-convert the model" in message
    assert list(tmp_path.iterdir()) == [tiny_dir]  # no offload files left behind


@pytest.mark.parametrize("garbage", ["nan", "random"])
def test_an_offload_file_overwritten_after_load_stops_the_run(tmp_path: Path, garbage: str) -> None:
    engine = Engine.load("tiny-llama", policy=ON_DISK, offload_dir=tmp_path)
    seqs = [[1, 2, 3, 4], [5, 6]]
    healthy = engine.logprobs(seqs)
    (path,) = [p for p in engine.tiers["weights"][2].directory.iterdir() if "layers.1.mlp" in p.name]
    size = path.stat().st_size
    if garbage == "nan":
        path.write_bytes(torch.full((size // 4,), math.nan).numpy().tobytes())
    else:
        path.write_bytes(np.random.default_rng(0).bytes(size))
    for call in (lambda: engine.logprobs(seqs), lambda: engine.generate(seqs, max_new_tokens=3)):
        message = one_line_error(call)
        assert "layer layers.1.mlp" in message and "changed while the engine ran" in message
        assert str(engine.tiers["weights"][2].directory) in message
    assert engine.tiers["weights"][2].directory.is_dir() and len(healthy) == 2


def test_activations_that_overflow_name_the_layer_where_they_first_do(tiny_dir: Path) -> None:
    damage(tiny_dir, "model.layers.0.post_attention_layernorm.weight", 1e38)  # finite, but products overflow
    engine = Engine.load(tiny_dir)
    for call in (
        lambda: engine.logprobs([[1, 2, 3, 4]]),
        lambda: engine.score([([1, 2], [[3], [4, 5]])]),
        lambda: engine.generate([[1, 2, 3]], max_new_tokens=2),
        lambda: engine.generate([[1, 2, 3]], max_new_tokens=2, temperature=1.0),
        lambda: engine.decode_logprobs([[1, 2]], [[3, 4]]),
    ):
        message = one_line_error(call)
        assert "first appear in the output of layer layers.0.mlp" in message and "overflow" in message


@pytest.mark.parametrize("name", TINY_MODELS)
def test_healthy_models_never_trip_the_finiteness_check(name: str) -> None:
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    for dtype in ("float32", "bfloat16"):
        for policy in (Policy(gpu_batch_size=2), Policy(gpu_batch_size=2, stream_unembedding=True)):
            engine = Engine.load(name, dtype=dtype, policy=policy)
            assert all(torch.isfinite(lp).all() for lp in engine.logprobs(seqs))
            engine.score([(seqs[0], seqs[1:])])
            engine.decode_logprobs(seqs, seqs)
            engine.generate(seqs, max_new_tokens=4)
            engine.generate(seqs, max_new_tokens=4, temperature=1.0, top_k=5, top_p=0.9)
