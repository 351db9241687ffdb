"""The perplexity check, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wikitext_word_perplexity_matches_transformers() -> None:
    """Acceptance: SmolLM2 word perplexity on the first 10 WikiText-2 documents within 0.1 %."""
    script = ROOT / "benchmarks" / "wikitext_perplexity.py"
    result = subprocess.run(
        [sys.executable, str(script), "--docs", "10", "--tolerance", "1e-3"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "OK" in result.stdout
