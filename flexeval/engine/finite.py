"""Finiteness: weights checked as they load, readouts after every pass, and a diagnosis on failure.

A NaN weight (a corrupt checkpoint, or an offload file overwritten while the engine runs) or
an overflowing activation turns log-likelihoods into NaN, which lm-eval counts as wrong answers:
the run would report an accuracy near 0 and exit 0. So:

- `WeightCheck` refuses a non-finite checkpoint weight as `Engine.load` stores it, naming the
  checkpoint tensor: one minimum-and-maximum pass over each weight (SmolLM2-135M, two busy CPU
  cores: 23 ms of a 0.9 s fp32 load from the page cache, 2.5 %);
- the engine asks every micro-batch's readout whether its logits were finite after each pass
  (`Readout.finite`): one reduction over the few values a readout keeps per row (SmolLM2,
  logprobs of 8 x 128 tokens: 0.3 ms of 2.4 s; 16 greedy decoding passes: 2 ms of 1.1 s, 0.2 %);
- only when that fails, `Inspection` runs the pass again with every layer's weights, output and
  logits checked, and names the first layer where non-finite values appear, and why. Weights
  that were finite at load and are not now changed underneath the engine.

Finite garbage (an offload file overwritten with zeros) passes these checks: only a checksum
of every read would catch it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from itertools import accumulate
from typing import Literal

import torch
from torch import Tensor

from flexeval.engine.placement import WeightStore, owners
from flexeval.engine.readout import all_finite
from flexeval.engine.tiers import DiskTier
from flexeval.errors import FlexevalError
from flexeval.models.checkpoint import Lazy, Source
from flexeval.models.common import Cache, Layer, Model, Readout, Step, Weights

Found = Literal["weights", "output", "logits"]  # where in a layer `Inspection` first saw non-finite values


class NonFiniteError(FlexevalError):
    """NaN or infinite weights or values: the run stops rather than report numbers computed from them."""


def is_finite(t: Tensor) -> bool:
    """Whether every value of a float tensor is finite (tensors of other dtypes always are)."""
    return not t.is_floating_point() or bool(all_finite(t))


class WeightCheck:
    """Refuses checkpoint weights with NaN or infinite values as `Engine.load` stores them,
    naming the checkpoint tensor. A tied weight is checked once, by its owner; a `Lazy` one a
    slice at a time as its tier reads it; llama.cpp blocks (`compression=native`) are kept
    undecoded and so are not checked here (a pass over them would cost a dequantization)."""

    def __init__(self, model: Model, checkpoint: Source) -> None:
        self.model, self.checkpoint = model, checkpoint
        self.owner = owners(model.layers)

    def __call__(self, j: int, bundle: Mapping[str, Tensor | tuple[Tensor, ...] | Lazy]) -> dict:
        """Layer j's weights, the tensors checked and the `Lazy` ones checking as they are read."""
        checked = dict(bundle)
        for name, value in bundle.items():
            if self.owner[j, name] != (j, name) or isinstance(value, tuple):
                continue
            if isinstance(value, Lazy):
                checked[name] = replace(value, read=self._checked_read(j, name, value.read))
            elif not is_finite(value):
                raise self._error(j, name, value, 0)
        return checked

    def _checked_read(self, j: int, name: str, read: Callable[[int, int], Tensor]) -> Callable[[int, int], Tensor]:
        def checked(start: int, stop: int) -> Tensor:
            rows = read(start, stop)
            if not is_finite(rows):
                raise self._error(j, name, rows, start)
            return rows

        return checked

    def _error(self, j: int, name: str, rows: Tensor, start: int) -> NonFiniteError:
        """Names the checkpoint tensor of the first bad row: fused weights (q, k and v) stack theirs."""
        layer, checkpoint = self.model.layers[j], self.checkpoint
        sources = [checkpoint.resolve(s) or s for s in layer.params[name].sources]
        bad = start + int((~torch.isfinite(rows.reshape(len(rows), -1)).all(1)).nonzero()[0]) if rows.ndim else 0
        ends = accumulate(checkpoint.shape(s)[0] if checkpoint.shape(s) else 1 for s in sources)
        source = next((s for s, end in zip(sources, ends) if bad < end), sources[-1])
        return NonFiniteError(
            f"{checkpoint.source}: tensor '{source}' (weight '{name}' of layer {layer.name}) has NaN or infinite "
            "values: the checkpoint is corrupt; re-download or re-convert the model"
        )


class Inspection:
    """A model's layers that note where non-finite values first appear: in the weights a layer
    is given, in its output, or in the logits it hands the readout. Run through the same pass
    as the one that failed, they compute what it computed (decoding rewrites the same cache
    columns), so the first note is where that pass went wrong."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.first: tuple[int, Found, list[str]] | None = None  # (layer index, where, weight names)
        self.layers = tuple(replace(layer, forward=self._inspected(j, layer)) for j, layer in enumerate(layers))

    def _inspected(self, j: int, layer: Layer) -> Callable[[Weights, Tensor | None, Step, Cache | None], Tensor]:
        def forward(weights: Weights, h: Tensor | None, step: Step, cache: Cache | None) -> Tensor:
            if self.first is not None:
                return layer.forward(weights, h, step, cache)
            bad = [n for n, w in weights.items() if isinstance(w, Tensor) and not is_finite(w)]
            if bad:
                self.first = (j, "weights", bad)
            out = layer.forward(weights, h, replace(step, readout=_Watched(step.readout, self, j)), cache)
            if self.first is None and not is_finite(out):
                self.first = (j, "output", [])
            return out

        return forward

    def error(self, store: WeightStore, dtype: torch.dtype) -> NonFiniteError:
        """What went wrong, in one line, from the first note."""
        if self.first is None:
            return NonFiniteError(
                "non-finite logits that computing the same pass again did not reproduce: a transient fault "
                "(memory, or an offload file that changed while the engine ran); load the engine again"
            )
        j, where, names = self.first
        layer = self.layers[j].name
        if where != "weights":
            remedy = (
                "compute in bfloat16 or float32"
                if dtype == torch.float16
                else "the weights hold values too large for any activation; re-download or re-convert the model"
            )
            place = f"the output of layer {layer}" if where == "output" else f"the logits of layer {layer}"
            return NonFiniteError(
                f"non-finite values first appear in {place}, from finite weights and input: "
                f"activations overflow {str(dtype).removeprefix('torch.')}: {remedy}"
            )
        tier = store.tiers[store.tier_of[store.owner[j, names[0]]]]
        held = f"read from the offload directory {tier.directory}" if isinstance(tier, DiskTier) else "in memory"
        if any(store.native[j, n] for n in names):  # undecoded at load, so never checked
            cause = "the checkpoint is corrupt; re-download or re-convert the model"
        elif isinstance(tier, DiskTier):
            cause = "they were finite when loaded, so the offload file changed while the engine ran; load it again"
        else:
            cause = "they were finite when loaded, so memory changed under the engine; load it again"
        return NonFiniteError(
            f"non-finite values first appear in layer {layer}: its weights {names}, {held}, "
            f"are NaN or infinite: {cause}"
        )


class _Watched:
    """A readout whose logits `Inspection` checks before handing them on."""

    def __init__(self, readout: Readout, inspection: Inspection, j: int) -> None:
        self.readout, self.inspection, self.j = readout, inspection, j

    def update(self, logits: Tensor, rows: slice, first_token: int) -> None:
        if self.inspection.first is None and not is_finite(logits):
            self.inspection.first = (self.j, "logits", [])
        self.readout.update(logits, rows, first_token)

    def result(self) -> Tensor:
        return self.readout.result()

    def finite(self) -> Tensor:
        return self.readout.finite()
