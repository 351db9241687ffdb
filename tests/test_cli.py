"""The main job and the perplexity check, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flexeval.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_scores_generates_and_reports_throughput(capsys) -> None:
    assert main(["--model", "tiny-llama", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "scored 8 prompts" in out and "generated" in out and out.count("tokens/s") == 2


def test_main_job_reports_bad_input_in_one_line(capsys) -> None:
    assert main(["--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model spec") and err.count("\n") == 1


@pytest.mark.slow
def test_wikitext_word_perplexity_matches_transformers() -> None:
    """Acceptance: SmolLM2 word perplexity on the first 10 WikiText-2 documents within 0.1 %."""
    script = ROOT / "benchmarks" / "wikitext_perplexity.py"
    result = subprocess.run(
        [sys.executable, str(script), "--docs", "10", "--tolerance", "1e-3"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "OK" in result.stdout
