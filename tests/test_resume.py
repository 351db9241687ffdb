"""A run's record survives what ends runs early: a failing task, a full output disk, `kill -9`;
`resume=<run dir>` finishes it without computing anything twice; labels say what ran."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flexeval import FlexevalError, resume
from flexeval import evaluate as app
from flexeval.resolve import resolve
from flexeval.resume import REQUESTS, RequestLog
from tests.helpers import compose_run

SUITE = ["model=tiny-llama", "task.tasks=[boolq,piqa]", "limit=6"]


def flexeval(*args: str, code: str = "") -> subprocess.CompletedProcess:
    """`python -m flexeval ARGS`, after `code` (which may patch the backend)."""
    program = f"{code}\nfrom flexeval.__main__ import main\nmain()"
    return subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=600)


def results(directory: Path) -> dict:
    return json.loads((directory / "results.json").read_text())


def test_unknown_keys_added_with_plus_are_refused_except_in_open_mappings() -> None:
    with pytest.raises(FlexevalError, match=r"unknown option limt \(added with \+\): did you mean limit\?"):
        resolve(compose_run("+limt=5"))
    with pytest.raises(FlexevalError, match="unknown option model.foo"):
        resolve(compose_run("+model.foo=1"))
    run = resolve(compose_run("model=tiny-llama", "+task.metadata.note=1", "+hardware.profile.disk_read=1e9"))
    assert run.config.task.metadata.note == 1


def test_a_failing_task_keeps_the_finished_ones_and_names_itself(tmp_path: Path) -> None:
    run = resolve(compose_run("model=tiny-llama", "task.tasks=[boolq,hellaswag]", "limit=3", "model.max_length=8"))
    with pytest.raises(FlexevalError, match=r"task hellaswag failed: .*finished tasks kept in .*: boolq"):
        app.evaluate(run, tmp_path)
    assert list(results(tmp_path)["results"]) == ["boolq"]
    assert (tmp_path / "samples_boolq.jsonl").is_file()
    assert "boolq" in (tmp_path / "table.md").read_text()


def test_a_full_output_disk_still_prints_every_metric(tmp_path: Path, monkeypatch, capsys) -> None:
    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(app, "write_text", full)
    with pytest.raises(FlexevalError, match=r"could not write the results to .*results_boolq.json: No space left"):
        app.evaluate(resolve(compose_run(*SUITE)), tmp_path)
    printed = capsys.readouterr().out
    assert "| boolq | acc |" in printed and "| piqa | acc_norm |" in printed


@pytest.mark.parametrize("where", ["write_text", "RequestLog"])
def test_a_run_directory_that_cannot_be_written_is_one_line_before_the_model_loads(
    tmp_path: Path, monkeypatch, where: str
) -> None:
    """As root a read-only mode does not stop writes, so the failures are made where they land:
    `run.json`'s write, and the request log's opening."""

    def refused(path: Path, *args) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    def no_model(run) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(resume, where, refused)
    monkeypatch.setattr(app, "_backend", no_model)
    with pytest.raises(FlexevalError, match=r"cannot write the run directory .*: Read-only file system\): free"):
        app.evaluate(resolve(compose_run(*SUITE)), tmp_path)


def test_a_suite_killed_in_its_second_task_resumes_without_computing_anything_twice(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert flexeval(*SUITE, f"hydra.run.dir={whole}").returncode == 0
    # piqa's first three requests are answered, then the process is killed as the OOM killer would
    kill = textwrap.dedent("""
        import os, signal
        from flexeval.lm import FlexGenLM
        score = FlexGenLM._loglikelihood_tokens
        def killing(self, requests, **kwargs):
            if getattr(self, "_calls", 0) == 1:  # the second task's
                score(self, requests[:3], **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            self._calls = getattr(self, "_calls", 0) + 1
            return score(self, requests, **kwargs)
        FlexGenLM._loglikelihood_tokens = killing
    """)
    assert flexeval(*SUITE, f"hydra.run.dir={killed}", code=kill).returncode == -9
    assert (killed / "results_boolq.json").is_file() and not (killed / "results_piqa.json").exists()
    assert len(RequestLog(killed / REQUESTS).answers) == 6 * 2 + 3  # boolq's yes/no, piqa's three

    resumed = flexeval(*SUITE, f"resume={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "boolq finished in" in resumed.stdout
    assert "resume: 3 of 12 loglikelihood requests read back, 9 to compute" in resumed.stdout
    assert results(killed)["results"] == results(whole)["results"]
    piqa = results(killed)["throughput"]["piqa"]
    assert (piqa["read_back_requests"], piqa["requests"]) == (3, 9)


def test_resume_refuses_a_run_of_other_options_and_a_damaged_log(tmp_path: Path) -> None:
    app.evaluate(resolve(compose_run(*SUITE)), tmp_path)
    with pytest.raises(FlexevalError, match=r"ran with other options \(limit=5 \(ran with 6\)\)"):
        resolve(compose_run(*SUITE[:-1], "limit=5", f"resume={tmp_path}"))
    with pytest.raises(FlexevalError, match="not a flexeval run directory"):
        resolve(compose_run(*SUITE, f"resume={tmp_path / 'elsewhere'}"))
    log = tmp_path / REQUESTS
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], lines[1][:20], *lines[2:]]) + "\n")
    with pytest.raises(FlexevalError, match=rf"{REQUESTS} line 2 is not a request's answer"):
        RequestLog(log)


def test_resume_is_refused_for_a_sweep(tmp_path: Path) -> None:
    result = flexeval("-m", "limit=2,3", f"resume={tmp_path}")
    assert result.returncode == 2 and "resume finishes one run" in result.stderr
