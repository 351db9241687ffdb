"""Readouts see the logits a block of rows (and, streamed, of vocabulary) at a time; they must
equal what the whole logits say."""

from __future__ import annotations

import pytest
import torch

from flexeval.engine.generation import Sampling, pick_tokens
from flexeval.engine.readout import ScoreReadout, StreamedScoreReadout, TokenReadout

CPU = torch.device("cpu")


def stream(readout, logits: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    for r in range(0, logits.shape[0], rows):
        for v in range(0, logits.shape[1], width):
            readout.update(logits[r : r + rows, v : v + width], slice(r, min(r + rows, logits.shape[0])), v)
    return readout.result()


@pytest.mark.parametrize("rows, width", [(1, 1000), (3, 7), (16, 333), (5, 1)])
def test_streamed_scores_equal_the_full_log_softmax(rows: int, width: int) -> None:
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0)) * 8
    targets = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(1))
    expected = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(stream(StreamedScoreReadout(targets), logits, rows, width), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_whole_rows_score_with_log_softmax_itself(rows: int) -> None:
    """Bit for bit what lm-eval's hf backend computes from the same logits."""
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0)) * 8
    targets = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(1))
    expected = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert torch.equal(stream(ScoreReadout(targets), logits, rows, 1000), expected)


@pytest.mark.parametrize("rows, width", [(1, 1000), (3, 7), (16, 10)])
def test_streamed_greedy_picks_the_first_maximum(rows: int, width: int) -> None:
    logits = torch.randint(0, 3, (16, 1000), generator=torch.Generator().manual_seed(0)).float()  # many ties
    picked = stream(TokenReadout(16, 1000, Sampling(), None, CPU), logits, rows, width)
    assert torch.equal(picked, logits.argmax(-1))


@pytest.mark.parametrize(
    "kind, rows, width",
    [(ScoreReadout, 1, 1000), (ScoreReadout, 16, 1000), (StreamedScoreReadout, 3, 7), (StreamedScoreReadout, 16, 10)],
)
def test_scores_know_whether_greedy_decoding_picks_the_target(kind: type, rows: int, width: int) -> None:
    logits = torch.randint(0, 3, (16, 1000), generator=torch.Generator().manual_seed(0)).float()  # many ties
    first_max = logits.argmax(-1)
    targets = torch.where(torch.arange(16) % 2 == 0, first_max, (first_max + 1) % 1000)  # half: a later tie or less
    readout = kind(targets)
    stream(readout, logits, rows, width)
    assert torch.equal(readout.greedy(), torch.arange(16) % 2 == 0)


def test_streamed_sampling_draws_from_the_whole_distribution() -> None:
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(0))
    sampling = Sampling(temperature=0.7, top_k=50, top_p=0.9, seed=3)
    picked = stream(TokenReadout(8, 500, sampling, torch.Generator().manual_seed(3), CPU), logits, 3, 64)
    assert torch.equal(picked, pick_tokens(logits, sampling, torch.Generator().manual_seed(3)))
