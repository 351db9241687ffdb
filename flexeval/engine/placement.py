"""Where each tensor class lives during a run, as the policy's percentages say.

Weights are placed tensor by tensor across the whole model, so each tier's share is met to
within one tensor's bytes (FlexGen rounds per layer and overshoots). The KV cache is placed per
(transformer block, micro-batch) unit and activations per micro-batch, so both can be split
across tiers too.

With `compress_weight`, every weight matrix is stored, moved and counted as its quantized parts
(codes, scales, minima; see `compression`) and dequantized on the compute device when a unit
loads it. Vectors (norms, biases) stay as they are: their bytes are negligible and their values
sensitive. Token tables (vocabulary × width) group like any matrix, whose output dimension the
vocabulary is; their rows (the tokens a step reads, a slice of the vocabulary) stay readable on
their own all the same, because codes are packed along the width and a row needs only its own
codes and its group's scale and minimum. Under the int4mm kernel, matrices whose shape tiles
keep their codes in the kernel's tiles; token tables and the rest stay packed by rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from flexeval.engine.policy import Policy, TensorClass
from flexeval.engine.tiers import BufferPool, Bundle, Fetched, Tier, distribute, nbytes
from flexeval.models.checkpoint import Lazy
from flexeval.models.common import ROWS, Cache, Layer, Param, StoredValues
from flexeval.quantization import blocks, int4mm
from flexeval.quantization.blocks import Blocks
from flexeval.quantization.compression import (
    Quantized,
    as_tiles,
    dequantize,
    part_name,
    quantize_rows,
    quantized_nbytes,
    split_part_name,
    tileable,
)
from flexeval.quantization.config import CompressionConfig


@dataclass
class Loaded:
    """Bundles fetched for one scheduling unit, plus the staging memory to hand back afterwards:
    tiers' read buffers, and the pooled buffers that weights were dequantized into. Quantized
    weights arrive as `Quantized` (native ones as `Blocks`) until `WeightStore.dequantize`."""

    bundles: list[dict[str, torch.Tensor | Quantized | Blocks]]
    handles: list[tuple[Tier, Fetched]] = field(default_factory=list)
    pooled: list[tuple[BufferPool, torch.Tensor]] = field(default_factory=list)

    def release(self) -> None:
        for tier, fetched in self.handles:
            tier.release(fetched)
        for pool, buffer in self.pooled:
            pool.release(buffer)
        self.handles.clear()
        self.pooled.clear()


WeightKey = tuple[int, str]  # (layer index, tensor name)


def owners(layers: Sequence[Layer]) -> dict[WeightKey, WeightKey]:
    """Each weight's owner: the first weight built from the same checkpoint tensors. Tied
    tensors (an embedding reused as the unembedding) are stored once, by their owner."""
    first: dict[tuple[str, ...], WeightKey] = {}
    return {
        (j, n): first.setdefault(p.sources, (j, n)) for j, layer in enumerate(layers) for n, p in layer.params.items()
    }


def native(param: Param, policy: Policy) -> bool:
    """Whether a weight is stored as its checkpoint's llama.cpp blocks (`Policy.native_weights`)."""
    return policy.native_weights and bool(param.blocks) and all(blocks.native(f) for f, _ in param.blocks)


def compression(param: Param, policy: Policy) -> CompressionConfig | None:
    """How a weight is stored: None means as it is."""
    if not policy.compress_weight or len(param.shape) < 2:
        return None
    config = policy.comp_weight_config
    if config.tiled and (param.by_token or not tileable(param.shape, config)):  # tables and odd shapes: by rows
        return replace(config, kernel="dequantize")
    return config


def stored_nbytes(param: Param, policy: Policy, dtype: torch.dtype) -> int:
    if native(param, policy):
        return sum(rows * blocks.row_bytes(name, param.shape[1]) for name, rows in param.blocks)
    config = compression(param, policy)
    return param.nbytes(dtype) if config is None else quantized_nbytes(param.shape, dtype, config)


def weight_tiers(layers: Sequence[Layer], policy: Policy, dtype: torch.dtype) -> dict[WeightKey, int]:
    """The tier of every stored weight tensor (owners only, see `owners`)."""
    names = [key for key, owner in owners(layers).items() if key == owner]
    sizes = [stored_nbytes(layers[j].params[name], policy, dtype) for j, name in names]
    return dict(zip(names, distribute(sizes, policy.split(TensorClass.WEIGHTS))))


def placed_tiers(layers: Sequence[Layer], policy: Policy, dtype: torch.dtype) -> dict[WeightKey, int]:
    """The tier every weight is read from: its own, or a tied one's owner's."""
    tiers = weight_tiers(layers, policy, dtype)
    return {key: tiers[owner] for key, owner in owners(layers).items()}


def act_placement(policy: Policy, micro_batches: int) -> list[int]:
    """The tier of each micro-batch's hidden state."""
    return distribute([1] * micro_batches, policy.split(TensorClass.ACT))


def cache_placement(policy: Policy, micro_batches: int, num_blocks: int) -> dict[tuple[int, int], int]:
    """The tier of each (transformer block, micro-batch)'s KV cache."""
    placed = distribute([1] * (num_blocks * micro_batches), policy.split(TensorClass.CACHE))
    return {(b, k): placed[b * micro_batches + k] for b in range(num_blocks) for k in range(micro_batches)}


def weight_bytes_per_tier(layers: Sequence[Layer], policy: Policy, dtype: torch.dtype) -> list[int]:
    placed = [0, 0, 0]
    for (j, name), tier in weight_tiers(layers, policy, dtype).items():
        placed[tier] += stored_nbytes(layers[j].params[name], policy, dtype)
    return placed


def group_rows(rows: torch.Tensor, config: CompressionConfig, ndim: int) -> torch.Tensor:
    """The rows of a quantized table's scales and minima that some of its rows (sorted) need:
    the same rows when groups run across them, each group once when groups run along them."""
    return torch.unique_consecutive(rows // config.group_size) if config.group_dim % ndim == 0 else rows


def table_rows(q: Quantized, rows: torch.Tensor) -> Quantized:
    """Some rows of a quantized token table, from their codes and the parameters `group_rows`
    chose; with groups along the rows, each row takes its group's scale and minimum and becomes
    a group of its own."""
    shape = (len(rows), *q.shape[1:])
    if q.config.group_dim % len(q.shape) != 0:
        return replace(q, shape=shape)
    groups = rows // q.config.group_size
    index = torch.searchsorted(group_rows(rows, q.config, len(q.shape)), groups).to(q.scale.device)
    return Quantized(q.codes, q.scale[index], q.minimum[index], shape, q.dtype, replace(q.config, group_size=1))


class WeightStore:
    """Every layer's weights, each tensor on the tier the policy assigned it (tied ones once)."""

    def __init__(
        self, layers: Sequence[Layer], tiers: Sequence[Tier | None], policy: Policy, dtype: torch.dtype
    ) -> None:
        self.layers = layers
        self.tiers = tiers
        self.dtype = dtype
        self.owner = owners(layers)
        self.tier_of = weight_tiers(layers, policy, dtype)
        self.placed = placed_tiers(layers, policy, dtype)
        self.compression = {
            (j, n): compression(p, policy) for j, layer in enumerate(layers) for n, p in layer.params.items()
        }
        self.native = {(j, n): native(p, policy) for j, layer in enumerate(layers) for n, p in layer.params.items()}
        # dequantized weights go to reused buffers on the CPU (CUDA's caching allocator reuses its own)
        packed = any(self.compression.values()) or any(self.native.values())
        self.pool = BufferPool(pin=False) if packed else None

    def put(
        self,
        j: int,
        bundle: Mapping[str, torch.Tensor | tuple[torch.Tensor, ...]],
        fitted: Mapping[str, Quantized] | None = None,
    ) -> None:
        """Store a layer's weights: tensors, or for native weights their sources' blocks (see
        `iter_weights`); `fitted` are some of them already quantized (see `quantization.gptq`)."""
        stored: Bundle = {}
        for name, tensor in bundle.items():
            config = self.compression[j, name]
            if self.native[j, name]:
                stored |= {part_name(name, i): segment for i, segment in enumerate(tensor)}
            elif config is None:
                stored[name] = tensor
            else:
                q = as_tiles(fitted[name], config) if fitted and name in fitted else _quantize(tensor, config)
                stored |= q.to_parts(name)
        for t, tier in enumerate(self.tiers):
            part = {n: tensor for n, tensor in stored.items() if self.tier_of.get((j, split_part_name(n)[0])) == t}
            if part:
                tier.put(self._key(j), part)

    def moves(self, indices: Sequence[int]) -> bool:
        """Whether loading these layers copies anything (else there is nothing to overlap)."""
        return any(not self.tiers[self._tier(j, name)].in_place for j in indices for name in self.layers[j].params)

    def load(self, indices: Sequence[int], rows: torch.Tensor | None = None) -> Loaded:
        """The weights of these layers; of their token-indexed tables only `rows` (sorted token ids),
        which the layer finds beside them under ROWS."""
        loaded = Loaded([])
        for j in indices:
            layer, bundle = self.layers[j], {}
            wanted = {} if rows is None else {name for name, p in layer.params.items() if p.by_token}
            requests: dict[tuple[int, int], dict[str, str]] = {}  # (tier, owning layer) -> stored name -> ours
            for name in layer.params:
                owner, owner_name = self.owner[j, name]
                stored, ours = self._stored_names(j, name, owner_name), self._stored_names(j, name, name)
                requests.setdefault((self._tier(j, name), owner), {}).update(zip(stored, ours))
            for (t, owner), names in requests.items():
                tier = self.tiers[t]
                wanted_rows = {
                    n: self._rows(j, ours, rows) for n, ours in names.items() if split_part_name(ours)[0] in wanted
                }
                fetched = tier.get(self._key(owner), wanted_rows, names=set(names))
                bundle |= {names[n]: tensor for n, tensor in fetched.bundle.items()}
                loaded.handles.append((tier, fetched))
            for name, param in layer.params.items():
                if self.native[j, name]:
                    segments = tuple(bundle.pop(n) for n in self._stored_names(j, name, name))
                    shape = param.shape if name not in wanted else (len(rows), param.shape[1])
                    bundle[name] = Blocks(segments, tuple(f for f, _ in param.blocks), shape, self.dtype)
                    continue
                config = self.compression[j, name]
                if config is None:
                    continue
                parts = {n: bundle.pop(n) for n in Quantized.part_names(name)}
                q = Quantized.from_parts(parts, name, param.shape, self.dtype, config)
                bundle[name] = q if name not in wanted else table_rows(q, rows)
            if wanted:
                bundle[ROWS] = rows
            loaded.bundles.append(bundle)
        return loaded

    def dequantize(self, loaded: Loaded, decoding: bool) -> Loaded:
        """The loaded weights ready to compute with: quantized ones dequantized, on the compute
        device by the compute thread, as FlexGen dequantizes in its compute stream: the I/O
        threads only move bytes (see `schedule.Executors.make` for why they stay single-threaded).
        Decoding steps multiply tiled 4-bit codes as they are (`quantization.int4mm`)."""
        for bundle in loaded.bundles:
            for name, value in bundle.items():
                if isinstance(value, Quantized) and decoding and int4mm.usable(value):
                    bundle[name] = int4mm.Int4Weight.of(value)
                elif isinstance(value, Quantized):
                    bundle[name] = dequantize(value, self._buffer(value.shape, value.dtype, value.codes, loaded))
                elif isinstance(value, Blocks):
                    out = self._buffer(value.shape, value.dtype, value.segments[0], loaded)
                    bundle[name] = blocks.dequantize(value, out)
        return loaded

    def _buffer(
        self, shape: tuple[int, ...], dtype: torch.dtype, stored: torch.Tensor, loaded: Loaded
    ) -> torch.Tensor | None:
        """Memory for a dequantized weight, handed back with the unit, or None for a fresh tensor."""
        if self.pool is None or stored.device.type != "cpu":
            return None
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        buffer = self.pool.acquire(nbytes)
        loaded.pooled.append((self.pool, buffer))
        return buffer[:nbytes].view(dtype).view(shape)

    def _stored_names(self, j: int, name: str, called: str) -> list[str]:
        """The stored tensors weight (j, name) is kept as, were it called `called` (a tied weight is
        stored under its owner's name): itself, its quantized parts or one part per source of blocks."""
        if self.native[j, name]:
            return [part_name(called, i) for i in range(len(self.layers[j].params[name].blocks))]
        if self.compression[j, name] is not None:
            return Quantized.part_names(called)
        return [called]

    def _rows(self, j: int, stored: str, rows: torch.Tensor) -> torch.Tensor:
        """The rows of a stored tensor or part that these rows of a token table need."""
        name, part = split_part_name(stored)
        if part in ("scale", "minimum"):
            return group_rows(rows, self.compression[j, name], len(self.layers[j].params[name].shape))
        return rows

    def _key(self, j: int) -> str:
        return f"w/{self.layers[j].name}"

    def _tier(self, j: int, name: str) -> int:
        return self.placed[j, name]


def _quantize(tensor: torch.Tensor | Lazy, config: CompressionConfig) -> Quantized:
    """A weight quantized a slice of rows at a time, each read only then when it is `Lazy`."""
    read = tensor.read if isinstance(tensor, Lazy) else lambda start, stop: tensor[start:stop]
    return quantize_rows(read, tuple(tensor.shape), config)


class BlockState:
    """The hidden states and KV caches of one block's micro-batches between scheduling units.

    A cache is stored with its parts flattened to rows of their last dimension, one row per
    (sequence, head, column), so that a tier can read and write single columns: a decoding step
    writes back only its new columns, and sparse attention fetches only the values it chose.

    Their sizes depend on the batch, so their room on a tier (the disk) is checked as they first
    arrive: a micro-batch's hidden state when it is first stored, its cache when its first block
    is, for every block of it that the tier will hold (they are all of one size). A tier is asked
    for room for everything it was promised and has not yet received, so a refusal comes before a
    write fails for want of space.
    """

    def __init__(
        self,
        act_tiers: Sequence[Tier],
        cache_tiers: Sequence[Tier],
        policy: Policy,
        micro_batches: int,
        num_blocks: int,
        restore_cache: Callable[[Bundle, StoredValues | None], Cache],
    ) -> None:
        self.act_tiers, self.cache_tiers = act_tiers, cache_tiers
        self.restore_cache = restore_cache  # a cache from the parts it was stored as
        self.act_tier = act_placement(policy, micro_batches)
        self.cache_tier = cache_placement(policy, micro_batches, num_blocks)
        self._stored: dict[str, Tier] = {}
        self._cache_parts: dict[str, dict[str, tuple[torch.Size, torch.dtype]]] = {}
        self._promised: dict[Tier, int] = {}  # bytes a tier had room for and has not yet received
        self._cache_promised: set[tuple[int, int]] = set()  # (tier, micro-batch) whose cache room was checked

    @property
    def moves(self) -> bool:
        """Whether any of this block's hidden states or caches live where fetching them copies."""
        used = [self.act_tiers[t] for t in self.act_tier] + [self.cache_tiers[t] for t in self.cache_tier.values()]
        return any(not tier.in_place for tier in used)

    def load_hidden(self, k: int) -> tuple[torch.Tensor | None, Loaded]:
        tier = self.act_tiers[self.act_tier[k]]
        if f"act/{k}" not in tier:
            return None, Loaded([])
        fetched = tier.get(f"act/{k}")
        return fetched.bundle["h"], Loaded([fetched.bundle], [(tier, fetched)])

    def store_hidden(self, k: int, h: torch.Tensor) -> None:
        tier, key = self.act_tiers[self.act_tier[k]], f"act/{k}"
        if key not in self._stored:
            self._promise(tier, h.nbytes, "activations")
        self._put(tier, key, {"h": h})

    def load_cache(self, block: int, k: int, values: bool = True) -> tuple[Cache, Loaded]:
        """Micro-batch k's cache of a block; without `values` (a sparse decoding step), a tier that
        copies sends only the keys, and attention fetches the values it chooses."""
        key = f"cache/{block}/{k}"
        tier, parts = self.cache_tiers[self.cache_tier[block, k]], self._cache_parts[key]
        left = set() if values or tier.in_place else {n for n in parts if split_part_name(n)[0] == "v"}
        fetched = tier.get(key, names=set(parts) - left if left else None)
        bundle = {n: t.view(parts[n][0]) for n, t in fetched.bundle.items()}
        bundle |= {n: torch.empty(parts[n][0], dtype=parts[n][1], device=tier.device) for n in left}
        stored = TierValues(tier, key, {n: parts[n] for n in sorted(left)}) if left else None
        return self.restore_cache(bundle, stored), Loaded([fetched.bundle], [(tier, fetched)])

    def store_cache(self, block: int, k: int, cache: Cache, columns: tuple[int, int] | None = None) -> None:
        """Store micro-batch k's cache of a block: whole, or (a decoding step) only its `columns`."""
        key = f"cache/{block}/{k}"
        tier, parts = self.cache_tiers[self.cache_tier[block, k]], cache.parts()
        if columns is None:
            self._cache_parts[key] = {n: (t.shape, t.dtype) for n, t in parts.items()}
            flat = {n: t.flatten(0, -2) for n, t in parts.items()}
            t = self.cache_tier[block, k]
            if (t, k) not in self._cache_promised:
                self._cache_promised.add((t, k))
                blocks_here = sum(1 for (_, m), placed in self.cache_tier.items() if (placed, m) == (t, k))
                self._promise(tier, nbytes(flat) * blocks_here, "KV cache")
            self._put(tier, key, flat)
            return
        if tier.in_place:  # the step wrote into the stored tensors themselves
            return
        b, heads, length = next(iter(parts.values())).shape[:3]
        index = _cache_rows(b, heads, length, torch.arange(*columns).expand(b, heads, -1))
        tier.write_rows(key, {n: (index, t[:, :, slice(*columns)].flatten(0, -2)) for n, t in parts.items()})

    def _promise(self, tier: Tier, size: int, what: str) -> None:
        """Check that `tier` has room for `size` more bytes of `what` besides those already promised."""
        promised = self._promised.get(tier, 0) + size
        tier.ensure_room(promised, what)
        self._promised[tier] = promised

    def _put(self, tier: Tier, key: str, bundle: Bundle) -> None:
        new = key not in self._stored
        tier.put(key, bundle)
        self._stored[key] = tier
        if new and tier in self._promised:
            self._promised[tier] -= nbytes(bundle)

    def close(self) -> None:
        """Free every tier of this block's state."""
        for key, tier in self._stored.items():
            tier.evict(key)
        self._stored.clear()
        self._cache_parts.clear()
        self._promised.clear()
        self._cache_promised.clear()


@dataclass(frozen=True)
class TierValues:
    """A cache's value parts left on their tier (`StoredValues`), for sequences `first`... of the
    micro-batch stored under `key`."""

    tier: Tier
    key: str
    parts: dict[str, tuple[torch.Size, torch.dtype]]  # name -> (b, kv_heads, max_len, last), dtype
    first: int = 0

    def rows(self, start: int, stop: int) -> TierValues:
        return replace(self, first=self.first + start)

    def at(self, columns: torch.Tensor) -> dict[str, torch.Tensor]:
        b, heads, m = columns.shape
        if m == 0:
            device = self.tier.device
            return {
                n: torch.empty((b, heads, 0, shape[-1]), dtype=dt, device=device)
                for n, (shape, dt) in self.parts.items()
            }
        length = next(iter(self.parts.values()))[0][2]
        index = _cache_rows(b, heads, length, columns.cpu(), self.first)
        wanted, inverse = torch.unique(index, return_inverse=True)  # query heads sharing a kv head overlap
        fetched = self.tier.get(self.key, rows=dict.fromkeys(self.parts, wanted), names=set(self.parts))
        try:
            inverse = inverse.to(self.tier.device)
            return {n: t[inverse].view(b, heads, m, -1) for n, t in fetched.bundle.items()}
        finally:
            self.tier.release(fetched)


def _cache_rows(b: int, heads: int, length: int, columns: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Stored row indices of (b, heads, m) cache columns of sequences first... (see `BlockState`)."""
    sequences = torch.arange(first, first + b)[:, None, None]
    return ((sequences * heads + torch.arange(heads)[None, :, None]) * length + columns).flatten()
