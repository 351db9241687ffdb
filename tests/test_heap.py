"""glibc's heap (`flexeval.engine.heap`): trimmed only once it has grown by its slack."""

from __future__ import annotations

from flexeval.engine import heap
from tests.helpers import MB


def test_the_heap_is_trimmed_only_once_it_has_grown_by_its_slack(monkeypatch) -> None:
    resident, trims = [100 * MB], []
    monkeypatch.setattr(heap, "_resident_anonymous", lambda: resident[0])
    monkeypatch.setattr(heap, "release_free_memory", lambda: trims.append(resident[0]))
    bounded = heap.Heap(slack=32 * MB)
    for grown in (10, 32, 33, 40, 60, 66):  # MB above the first reading
        resident[0] = (100 + grown) * MB
        bounded.settle()
    assert trims == [133 * MB, 166 * MB]  # each measured from the size after the last trim
