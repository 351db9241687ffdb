"""GPTQ (Frantar et al., 2023): weights rounded to their min–max grids so that each layer's
*outputs* on real text change least, rather than each weight on its own.

Min–max rounding puts every weight on its group's nearest grid point. GPTQ quantizes a matrix one
input column at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse of the layer's input second moments (H = Σ x xᵀ over
calibration tokens), so that the errors cancel in the product with typical inputs. Columns go in
order of decreasing H diagonal (act-order: the most-used inputs are rounded while the others can
still absorb their error), and each group's grid is the min–max grid of the original weights
(static groups), so a fitted matrix is stored exactly as a min–max one and `dequantize` reads it
unchanged: only the codes differ.

Layers are fitted in order, each on the inputs that the already-quantized layers before it
produce, and within a layer each matrix on inputs computed with the ones before it quantized
(true-sequential). This runs while the engine loads the checkpoint layer by layer, on its compute
device; results are cached on disk, since fitting a model takes minutes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from flexeval.atomic import atomic_file
from flexeval.models.common import Layer, Model, Step
from flexeval.quantization.calibration import Calibration
from flexeval.quantization.compression import Quantized, dequantize, pack, quantize
from flexeval.quantization.config import CompressionConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

VERSION = 1  # of the fitting procedure: part of the cache key
DAMPING = 0.01  # added to H's diagonal, as a share of its mean: keeps the inverse well conditioned
COLUMN_BLOCK = 128  # columns whose error updates are applied to the rest at once
MICRO_BATCH = 8  # calibration sequences per forward pass


def gptq(w: Tensor, hessian: Tensor, config: CompressionConfig) -> Quantized:
    """A 2-d weight (outputs, inputs) quantized by GPTQ against H = Σ x xᵀ of its inputs, on the
    min–max grids of `config`'s groups (either dimension)."""
    grid = quantize(w, config)  # the min-max grids, as the fit stores them (`grid_dtypes`)
    scale, minimum = (_per_weight(t.float(), w.shape, config) for t in (grid.scale, grid.minimum))
    step = torch.where(scale > 0, scale, 1.0)
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: any value serves, theirs costs nothing
    h[dead, dead] = 1
    order = torch.argsort(h.diagonal(), descending=True)
    h = h[order][:, order]
    h.diagonal().add_(DAMPING * h.diagonal().mean())
    # rows of the upper Cholesky factor of H⁻¹: how a column's error is spread over later columns
    spread = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    w = w.float()[:, order].clone()
    scale, minimum, step = scale[:, order], minimum[:, order], step[:, order]
    codes = torch.empty_like(w, dtype=torch.uint8)
    cols = w.shape[1]
    for start in range(0, cols, COLUMN_BLOCK):
        stop = min(start + COLUMN_BLOCK, cols)
        block, errors = w[:, start:stop], torch.empty(w.shape[0], stop - start, device=w.device)
        for i in range(stop - start):
            c = start + i
            code = ((block[:, i] - minimum[:, c]) / step[:, c]).round_().clamp_(0, config.levels)
            codes[:, c] = code.to(torch.uint8)
            error = (block[:, i] - (code * scale[:, c] + minimum[:, c])) / spread[c, c]
            block[:, i:] -= error[:, None] * spread[c, c:stop][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ spread[start:stop, stop:]
    codes = codes[:, torch.argsort(order)]
    return replace(grid, codes=pack(codes, config.num_bits))


def _per_weight(t: Tensor, shape: torch.Size, config: CompressionConfig) -> Tensor:
    """A per-group scale or minimum, (..., groups) over the other dimension, spread to every weight."""
    dim = config.group_dim % 2
    return t.repeat_interleave(config.group_size, dim=dim).narrow(dim, 0, shape[dim])


class _Inputs(TorchFunctionMode):
    """Accumulates H = Σ x xᵀ of the inputs that `F.linear` multiplies by some given weights."""

    def __init__(self, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.names = {id(t): name for name, t in weights.items()}
        self.hessians: dict[str, Tensor] = {}
        self.order: list[str] = []  # names in the order the forward pass used them

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            name = self.names.get(id(args[1] if len(args) > 1 else kwargs["weight"]))
            if name is not None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                if name not in self.hessians:
                    self.order.append(name)
                    self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.hessians[name] += (x.T @ x).double()
        return func(*args, **kwargs)


class Fitter:
    """Fits the matrices of each layer in turn as the engine loads them (`layer`), carrying the
    calibration text's hidden states forward through the quantized layers."""

    def __init__(
        self, model: Model, config: CompressionConfig, dtype: torch.dtype, device: torch.device, tokens: Tensor
    ) -> None:
        self.model, self.config, self.dtype, self.device = model, config, dtype, device
        ids = tokens.to(device)
        self.steps = [self._step(ids[i : i + MICRO_BATCH]) for i in range(0, len(ids), MICRO_BATCH)]
        self.hidden: list[Tensor | None] = [None] * len(self.steps)

    def _step(self, ids: Tensor) -> Step:
        """A prefill of calibration sequences; no head runs, so it reads no logits."""
        b, s = ids.shape
        return Step.of(self.model, self.dtype, ids, torch.arange(s, device=ids.device).expand(b, s))

    @torch.inference_mode()
    def layer(self, layer: Layer, bundle: Mapping[str, Tensor]) -> dict[str, Quantized]:
        """The matrices of this layer that it multiplies its inputs by, GPTQ-fitted; other weights
        the caller quantizes as usual. Layers past the last transformer block are not fitted
        (a head's input is gathered rows; its table is the embedding's, stored before)."""
        if layer.kind not in ("embed", "attention", "mlp"):
            return {}
        weights = {name: t.to(self.device) for name, t in bundle.items()}
        pending = {
            n: weights[n] for n, p in layer.params.items() if len(p.shape) == 2 and not p.by_token and n in weights
        }
        fitted: dict[str, Quantized] = {}
        inputs = self._run(layer, weights, pending)  # also finds the order the layer uses them in
        for k, name in enumerate(inputs.order):
            if k > 0:  # its inputs as the matrices fitted before it make them
                inputs = self._run(layer, weights, {name: pending[name]})
            fitted[name] = gptq(pending[name], inputs.hessians[name], self.config)
            weights[name] = dequantize(fitted[name])
        for name, p in layer.params.items():  # the rest as the store will quantize them, to run as they will
            if name not in fitted and name in weights and len(p.shape) == 2:
                weights[name] = dequantize(quantize(weights[name], self.config))
        self.hidden = [layer.forward(weights, h, step, None) for h, step in zip(self.hidden, self.steps)]
        return {name: _to_cpu(q) for name, q in fitted.items()}

    def _run(self, layer: Layer, weights: Mapping[str, Tensor], watched: Mapping[str, Tensor]) -> _Inputs:
        with _Inputs(watched) as inputs:
            for h, step in zip(self.hidden, self.steps):
                layer.forward(weights, h, step, None)
        return inputs


def _to_cpu(q: Quantized) -> Quantized:
    return replace(q, codes=q.codes.cpu(), scale=q.scale.cpu(), minimum=q.minimum.cpu())


class FittedWeights:
    """GPTQ-fitted matrices of a model, per layer: read from the on-disk cache when this model,
    dtype, config and calibration were fitted before, else fitted as layers load and then saved."""

    def __init__(
        self,
        model: Model,
        checkpoint: Path,
        config: CompressionConfig,
        dtype: torch.dtype,
        device: torch.device,
        calibration: Calibration,
        tokenizer: PreTrainedTokenizerBase,
        cache: Path,
    ) -> None:
        self.path = cache / "gptq" / f"{_key(checkpoint, config, dtype, calibration)}.safetensors"
        self.model, self.config, self.dtype = model, config, dtype
        self.fitter = None
        self.fitted: dict[int, dict[str, Quantized]] = {}
        if not self.path.is_file():
            self.fitter = Fitter(model, config, dtype, device, torch.tensor(calibration.tokens(tokenizer)))
            self.progress = tqdm(total=len(model.layers), desc="gptq fit", unit="layer")

    def layer(self, j: int, bundle: Mapping[str, Tensor]) -> dict[str, Quantized]:
        if self.fitter is None:
            return dict(self._cached(j))
        self.fitted[j] = self.fitter.layer(self.model.layers[j], bundle)
        self.progress.update()
        return self.fitted[j]

    def save(self) -> None:
        """Write what was fitted (nothing to do when it came from the cache)."""
        if self.fitter is None:
            return
        self.progress.close()
        tensors = {
            stored: tensor.contiguous()
            for j, layer in self.fitted.items()
            for name, q in layer.items()
            for stored, tensor in q.to_parts(f"{j}.{name}").items()
        }
        with atomic_file(self.path) as scratch:
            save_file(tensors, scratch, metadata={"version": str(VERSION)})

    def _cached(self, j: int) -> Iterator[tuple[str, Quantized]]:
        layer = self.model.layers[j]
        with safe_open(self.path, framework="pt") as f:
            keys = set(f.keys())
            for name, p in layer.params.items():
                names = Quantized.part_names(f"{j}.{name}")
                if names[0] in keys:
                    parts = {n: f.get_tensor(n) for n in names}
                    yield name, Quantized.from_parts(parts, f"{j}.{name}", p.shape, self.dtype, self.config)


def _key(checkpoint: Path, config: CompressionConfig, dtype: torch.dtype, calibration: Calibration) -> str:
    """What the fitted weights depend on: the checkpoint's files (paths, sizes, times), the
    quantization, the dtype, the calibration text and this procedure's version."""
    files = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint.iterdir() if p.is_file())
    file = calibration.existing_file().resolve()
    text = [str(file), file.stat().st_size, file.stat().st_mtime_ns]
    facts = [VERSION, files, asdict(config), str(dtype), asdict(replace(calibration, path="")), text]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:24]
