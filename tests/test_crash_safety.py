"""Nothing lost, nothing silently wrong: what a killed run leaves is reclaimed, an offload directory
that is missing, unwritable or too full is refused before any weights are written, disk space is
checked for everything a policy puts on disk, I/O errors keep their cause, shard paths stay put."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flexeval import Engine, FlexevalError, Policy
from flexeval.atomic import atomic_directory, atomic_file
from flexeval.engine import tiers
from flexeval.models import registry
from flexeval.models.checkpoint import open_checkpoint
from flexeval.ownership import Owner, claim, disk_bytes
from tests.helpers import DISK

ON_DISK = Policy(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)


def owned(parent: Path, name: str, owner: Owner | None, size: int = 2**20) -> Path:
    """A directory as a run would leave it: some bytes, and its owner recorded (or none)."""
    directory = parent / name
    directory.mkdir()
    (directory / "payload.bin").write_bytes(b"\1" * size)
    if owner is not None:
        claim(directory, owner)
    return directory


def gone_pid() -> int:
    """A pid no process has: that of a child already reaped."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def killed_child(script: str, *args: str) -> None:
    """Run `script` in a new interpreter until it prints its first line, then kill it with SIGKILL."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready", "the child died before it was ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()


def test_the_next_engine_reclaims_offload_folders_of_dead_owners_only(tmp_path, caplog) -> None:
    me = Owner.current()
    dead = owned(tmp_path, "flexeval-dead", replace(me, pid=gone_pid()))
    recycled = owned(tmp_path, "flexeval-recycled", replace(me, start=me.start - 1))  # a live pid, not the owner
    live = owned(tmp_path, "flexeval-live", me)
    elsewhere = owned(tmp_path, "flexeval-elsewhere", replace(me, pid=gone_pid(), host="another-host"))
    unowned = owned(tmp_path, "flexeval-unowned", None)
    with caplog.at_level(logging.WARNING, logger="flexeval.ownership"):
        engine = Engine.load("tiny-llama", policy=ON_DISK, offload_dir=tmp_path)
    assert not dead.exists() and not recycled.exists()
    assert live.exists() and elsewhere.exists() and unowned.exists()
    assert "reclaimed 2.0 MiB from 2 offload folders left by killed runs" in caplog.text
    engine.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flexeval-elsewhere", "flexeval-live", "flexeval-unowned"]


def test_a_refusal_for_lack_of_space_names_the_folders_left_there(tmp_path, monkeypatch) -> None:
    owned(tmp_path, "flexeval-unowned", None)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=0))
    refused = r"GiB of weights there \(1 other flexeval-\* folder there holds [\d.]+ GiB: delete those no running"
    with pytest.raises(FlexevalError, match=refused):
        Engine.load("tiny-llama", policy=ON_DISK, offload_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["flexeval-unowned"]


def test_an_engine_killed_with_sigkill_leaves_nothing_after_the_next_run(tmp_path, caplog) -> None:
    killed_child(
        """
        import sys, time
        from flexeval import Engine, Policy
        policy = Policy(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)
        engine = Engine.load("tiny-llama", policy=policy, offload_dir=sys.argv[1])
        print("ready", flush=True)
        time.sleep(60)
        """,
        str(tmp_path),
    )
    (left,) = tmp_path.glob("flexeval-*")
    assert disk_bytes(left) > 100_000  # the weights' disk share
    with caplog.at_level(logging.WARNING, logger="flexeval.ownership"):
        engine = Engine.load("tiny-llama", policy=ON_DISK, offload_dir=tmp_path)
    assert not left.exists()
    assert "from 1 offload folder left by killed runs" in caplog.text
    engine.close()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_the_next_atomic_write_reclaims_the_scratch_of_a_killed_writer(tmp_path, caplog, kind) -> None:
    killed_child(
        f"""
        import sys, time
        from pathlib import Path
        from flexeval.atomic import atomic_{kind}
        with atomic_{kind}(Path(sys.argv[1]) / "converted") as scratch:
            if "{kind}" == "directory":
                scratch = scratch / "weights.bin"
            scratch.write_bytes(bytes(2**20))
            print("ready", flush=True)
            time.sleep(60)
        """,
        str(tmp_path),
    )
    (left,) = tmp_path.glob(".tmp-*")
    live = owned(tmp_path, ".tmp-other-live", Owner.current())
    unowned = owned(tmp_path, ".tmp-other-unowned", None)
    with caplog.at_level(logging.WARNING, logger="flexeval.ownership"):
        with atomic_file(tmp_path / "converted") as scratch:
            scratch.write_text("done")
    assert not left.exists() and live.exists() and unowned.exists()
    assert re.search(r"reclaimed 1\.\d MiB from 1 unfinished write left by killed runs", caplog.text)
    assert (tmp_path / "converted").read_text() == "done"


def test_a_destination_another_process_completed_meanwhile_is_kept(tmp_path) -> None:
    destination = tmp_path / "converted"
    with atomic_directory(destination) as scratch:
        (scratch / "ours").write_text("ours")
        destination.mkdir()
        (destination / "theirs").write_text("theirs")
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]
    assert [p.name for p in destination.iterdir()] == ["theirs"]


def test_the_kv_cache_is_refused_before_it_overfills_the_offload_disk(tmp_path, monkeypatch) -> None:
    """The disk holds the weights' share with a little to spare, not a block's KV cache: the check
    at load passes, and the first block's cache is refused with the space it needs and has."""
    model = registry.build_model(registry.resolve("tiny-llama"))
    weights = sum(p.nbytes(torch.float32) for layer in model.layers for p in layer.params.values())
    usage = shutil.disk_usage(tmp_path)
    spare = 64 * 2**10  # the weight files' alignment and the folders' own blocks
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: usage._replace(free=max(weights + spare - disk_bytes(tmp_path), 0))
    )
    engine = Engine.load("tiny-llama", dtype="float32", policy=replace(ON_DISK, gpu_batch_size=8), offload_dir=tmp_path)
    prompts = [list(range(i, i + 100)) for i in range(8)]
    refused = rf"offload directory {tmp_path}/flexeval-\w+ has .* MiB free but this batch's KV cache would take"
    with pytest.raises(FlexevalError, match=refused):
        engine.generate(prompts, max_new_tokens=20)
    engine.close()


@pytest.mark.parametrize("overlap", [True, False])
def test_a_full_disk_under_the_kv_cache_is_reported_with_its_path(tmp_path, monkeypatch, overlap) -> None:
    pwrite = tiers._pwrite

    def full_for_the_cache(fd: int, path: Path, data, offset: int) -> None:
        if path.parent.name == "cache":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        pwrite(fd, path, data, offset)

    monkeypatch.setattr(tiers, "_pwrite", full_for_the_cache)
    engine = Engine.load("tiny-llama", policy=replace(ON_DISK, overlap=overlap), offload_dir=tmp_path)
    with pytest.raises(FlexevalError, match=rf"writing {tmp_path}/flexeval-\w+/cache/\S+ failed: No space left on"):
        engine.generate([[1, 2, 3]], max_new_tokens=4)
    engine.close()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/absolute", "sub/../../outside.safetensors"])
def test_shards_named_outside_the_checkpoint_directory_are_refused(tiny_dir, shard) -> None:
    outside = tiny_dir.parent / "outside.safetensors"
    shutil.copy(tiny_dir / "model.safetensors", outside)
    (tiny_dir / "sub").mkdir()
    if shard == "/absolute":
        shard = str(outside)
    names = open_checkpoint(tiny_dir).names()
    index = tiny_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, shard)}))
    with pytest.raises(FlexevalError, match=re.escape(f"{index} names weight file {shard} outside")):
        open_checkpoint(tiny_dir)


def test_missing_offload_directory(tmp_path: Path) -> None:
    with pytest.raises(FlexevalError, match="does not exist"):
        Engine.load("tiny-llama", policy=Policy(**DISK), offload_dir=tmp_path / "nope")


def test_unwritable_offload_directory() -> None:
    with pytest.raises(FlexevalError, match="is not writable"):
        Engine.load("tiny-llama", policy=Policy(**DISK), offload_dir="/proc")


def test_full_offload_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(FlexevalError, match="GiB free but the policy puts"):
        Engine.load("tiny-llama", policy=Policy(**DISK), offload_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_disk_filling_up_midway_is_reported_and_cleaned(tmp_path: Path, monkeypatch) -> None:
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(FlexevalError, match="No space left on device"):
        Engine.load("tiny-llama", policy=Policy(**DISK), offload_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
