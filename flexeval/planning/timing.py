"""How long one layer of each kind of a model takes on this machine, measured once per model shape
and machine, cached beside the hardware profile: the cost model fits its arithmetic to these
times rather than to FLOP counts, since dispatch and memory traffic dominate small layers."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flexeval.atomic import write_text
from flexeval.engine.generation import Sampling
from flexeval.engine.readout import ScoreReadout, TokenReadout
from flexeval.engine.schedule import forward
from flexeval.models.common import KVCache, Layer, Model, Step, Weights
from flexeval.planning.hardware import COLD_BYTES, VERSION, machine_key, timed

log = logging.getLogger(__name__)

# Shapes at which `measure_layers` times a model's own layers: (sequences, tokens) for prefill,
# (sequences, context) for decoding; a small shape, where dispatch dominates, and a large one,
# where arithmetic does (the unembedding's large prefill shape is smaller: it is the costliest).
LAYER_SHAPES = {
    "prefill": ((1, 32), (16, 256)),
    "decode": ((1, 64), (64, 256)),
}
UNEMBED_PREFILL = ((1, 32), (2, 256))
LayerTimes = dict[str, list[tuple[int, int, float]]]  # "kind/phase" -> [(sequences, tokens or context, seconds)]


def measure_layers(model: Model, dtype: torch.dtype, device: torch.device) -> LayerTimes:
    """Seconds of one layer of each kind of `model`, with random weights, through the schedule's
    own `forward`, at `LAYER_SHAPES`: the cost model fits its arithmetic to these. Calls cycle
    through copies of the weights larger together than a CPU's caches, because in a run every
    layer finds its weights gone from the caches (one layer repeated runs up to 40 % faster)."""
    times: LayerTimes = {}
    for layer in {layer.kind: layer for layer in model.layers}.values():
        copies = max(2, min(128, -(-COLD_BYTES // layer.nbytes(dtype))))
        first = {
            name: (
                torch.randn(p.shape, device=device) * 0.02 if len(p.shape) > 1 else torch.ones(p.shape, device=device)
            )
            for name, p in layer.params.items()
        }
        bundles = [{name: t.to(dtype, copy=True) for name, t in first.items()} for _ in range(copies)]
        for phase, shapes in LAYER_SHAPES.items():
            if layer.kind == "unembed" and phase == "prefill":
                shapes = UNEMBED_PREFILL
            times[f"{layer.kind}/{phase}"] = [
                (b, n, timed(_layer_call(model, layer, bundles, dtype, device, b, n, phase == "decode"), device, 0.03))
                for b, n in shapes
            ]
    return times


def _layer_call(
    model: Model,
    layer: Layer,
    bundles: list[Weights],
    dtype: torch.dtype,
    device: torch.device,
    b: int,
    n: int,
    decoding: bool,
) -> Callable[[], Any]:
    """One forward of a layer over b sequences: n new tokens each, or one token after n cached."""
    s, start = (1, n) if decoding else (n, 0)
    ids = torch.randint(0, model.vocab_size, (b, s), device=device)
    positions = torch.arange(start, start + s, device=device).expand(b, s)
    rows = torch.arange(b * s if not decoding else b, device=device)
    readout = (
        TokenReadout(b, model.vocab_size, Sampling(), None, device)
        if decoding
        else ScoreReadout(torch.randint(0, model.vocab_size, (len(rows),), device=device))
    )
    step = Step.of(model, dtype, ids, positions, cache_start=start, head_rows=rows, readout=readout)
    cache = None
    if layer.kind == "attention" and decoding:
        # allocated for the tokens still to come, as generation allocates it: attention then reads
        # strided views of it, not whole tensors
        shape = (b, model.kv_heads, n + 1 + n // 4, model.head_dim)
        cache = KVCache(torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype))
    hidden = None
    if layer.kind == "unembed":
        hidden = torch.randn(len(rows), layer.params["lm_head"].shape[1], device=device).to(dtype)
    elif layer.kind != "embed":
        hidden = torch.randn(b, s, model.hidden_size, device=device).to(dtype)
    turn = itertools.cycle(bundles)
    return lambda: forward(layer, next(turn), hidden, step, cache)


def layer_times(model: Model, dtype: torch.dtype, device: torch.device, offload_dir: Path, cache: Path) -> LayerTimes:
    """`measure_layers` of this model's shapes on this machine: cached beside the profile."""
    shapes = {layer.kind: sorted((n, p.shape) for n, p in layer.params.items()) for layer in model.layers}
    facts = json.dumps([VERSION, machine_key(device, offload_dir), str(dtype), model.family, model.head_dim, shapes])
    path = cache / "hardware" / f"layers-{hashlib.sha256(facts.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        try:
            return {key: [tuple(row) for row in rows] for key, rows in json.loads(path.read_text()).items()}
        except (ValueError, TypeError):
            pass  # measured anew below
    log.warning(
        "policy=auto: timing one layer of each kind of this %s model once (cached in %s); this takes its "
        "layers' memory (several copies of the largest), beyond any budget, and later searches skip it",
        model.family,
        path.parent,
    )
    times = measure_layers(model, dtype, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(times) + "\n")
    return times
