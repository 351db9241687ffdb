"""`Policy`: where every class of tensor lives, how it is compressed and how sequences are
batched (FlexGen's fields).

Each tensor class (weights, KV cache, activations) is spread over three tiers by percentages:
the compute tier ("gpu"), CPU RAM ("cpu") and disk (the rest). On a machine without CUDA the
compute tier *is* CPU RAM, so "gpu" and "cpu" both mean resident in memory and only the disk
share changes what happens; the same policy file runs on both kinds of machine.

Settings only, without torch: the Hydra app builds its schema from these dataclasses and checks a
configuration before anything heavy is imported (`quantization.compression` holds the quantizer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from flexeval.errors import FlexevalError
from flexeval.quantization.config import CompressionConfig


class TensorClass(str, Enum):
    """A class of tensors that a policy places by its own percentages; the value is the prefix of
    its fields (`w_gpu_percent`, ...), so plain strings keep working where one is expected."""

    WEIGHTS = "w"
    CACHE = "cache"
    ACT = "act"

    def __str__(self) -> str:  # what `enum.StrEnum` (Python 3.11+) does: f-strings spell the value
        return self.value

    __format__ = str.__format__


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int = 32  # sequences computed together (one micro-batch)
    num_gpu_batches: int = 1  # micro-batches that share one pass of the weights (block = product)
    # most tokens (prompt + new) a micro-batch holds, so that long sequences come fewer at a time
    # and working memory stays what `policy=auto` planned; a longer sequence goes alone (0: no limit)
    gpu_batch_tokens: int = 0
    w_gpu_percent: float = 100.0
    w_cpu_percent: float = 0.0
    cache_gpu_percent: float = 100.0
    cache_cpu_percent: float = 0.0
    act_gpu_percent: float = 100.0
    act_cpu_percent: float = 0.0
    overlap: bool = True  # prefetch the next layer's weights and the next micro-batch's state while computing
    sep_layer: bool = True  # schedule attention and MLP as separate layers (False: one unit per block)
    # read the unembedding a vocabulary slice at a time, overlapping its reads with its own compute;
    # log-probabilities then come from an online log-sum-exp, not bit-comparable with hf's log_softmax
    stream_unembedding: bool = False
    pin_weight: bool = True  # pinned CPU buffers for CPU-resident and disk-read weights (CUDA only)
    cpu_cache_compute: bool = False  # decode attention where a CPU-resident cache lives (CUDA only)
    attn_sparsity: float = 1.0  # decoding reads the values of this share of earlier positions (top-k); 1 = dense
    compress_weight: bool = False  # weights stored as group-wise quantized codes, dequantized right before use
    comp_weight_config: CompressionConfig = CompressionConfig(num_bits=4, group_size=64, group_dim=0)
    compress_cache: bool = False
    comp_cache_config: CompressionConfig = CompressionConfig(num_bits=4, group_size=64, group_dim=-1)
    # weights a GGUF file ships in llama.cpp's blocks stay those blocks, dequantized right before use
    # (bitwise the file's values: `quantization.blocks`); other weights stay as they are
    native_weights: bool = False
    # a process under a RAM budget: large buffers mapped apart and glibc's heaps trimmed as they grow
    # (`engine.heap`), so resident memory follows the live tensors (set by policy=auto for a CPU
    # budget; it costs page faults)
    bound_heap: bool = False

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FlexevalError(f"policy: {name} must be a positive integer, got {value!r}")
        tokens = self.gpu_batch_tokens
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise FlexevalError(f"policy: gpu_batch_tokens must be 0 (no limit) or a positive integer, got {tokens!r}")
        for kind in TensorClass:
            gpu, cpu = getattr(self, f"{kind.value}_gpu_percent"), getattr(self, f"{kind.value}_cpu_percent")
            for name, value in ((f"{kind.value}_gpu_percent", gpu), (f"{kind.value}_cpu_percent", cpu)):
                if not 0 <= value <= 100:
                    raise FlexevalError(f"policy: {name} must be between 0 and 100, got {value}")
            if gpu + cpu > 100:
                raise FlexevalError(
                    f"policy: {kind.value}_gpu_percent + {kind.value}_cpu_percent = {gpu + cpu} exceeds 100 "
                    "(the disk share is what remains)"
                )
        if not 0 < self.attn_sparsity <= 1:
            raise FlexevalError(
                f"policy: attn_sparsity must be in (0, 1] (the share of cached values each decoding query "
                f"reads; 1 = dense), got {self.attn_sparsity}"
            )
        for name in ("comp_weight_config", "comp_cache_config"):
            if not isinstance(getattr(self, name), CompressionConfig):
                raise FlexevalError(f"policy: {name} must be a CompressionConfig, got {getattr(self, name)!r}")
        if self.comp_cache_config.group_dim not in (-1, 3):
            raise FlexevalError(
                "policy: comp_cache_config.group_dim must be the head dimension (-1): groups along tokens or heads "
                f"would change as tokens are appended, got {self.comp_cache_config.group_dim}"
            )
        if self.native_weights and self.compress_weight:
            raise FlexevalError(
                "policy: native_weights keeps a GGUF file's own blocks and compress_weight quantizes the weights "
                "again: choose one"
            )
        if self.comp_cache_config.fit == "gptq":
            raise FlexevalError(
                "policy: comp_cache_config.fit cannot be gptq: it fits weight matrices to the inputs they "
                "multiply; the KV cache is quantized as it is written (use minmax or mse)"
            )

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def split(self, kind: TensorClass) -> tuple[float, float, float]:
        """(compute, cpu, disk) shares in [0, 1] of a tensor class."""
        prefix = TensorClass(kind).value
        gpu, cpu = getattr(self, f"{prefix}_gpu_percent"), getattr(self, f"{prefix}_cpu_percent")
        return gpu / 100, cpu / 100, max(0.0, 100 - gpu - cpu) / 100

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], preset: str = "all-resident") -> Policy:
        """A preset with some fields overridden; values may be strings (command lines), which
        are converted to the field's type."""
        if preset not in PRESETS:
            raise FlexevalError(f"policy: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        types = {f.name: type(f.default) for f in fields(cls)}
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise FlexevalError(f"policy: unknown fields {unknown}; valid fields: {', '.join(sorted(types))}")
        return cls(**(PRESETS[preset] | {name: _convert(name, v, types[name]) for name, v in values.items()}))


PRESETS: dict[str, dict[str, Any]] = {
    "all-resident": {},
    "cpu-offload": dict(w_gpu_percent=0, w_cpu_percent=100, cache_gpu_percent=0, cache_cpu_percent=100),
    "disk-offload": dict(
        num_gpu_batches=8, w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=100
    ),
}


# Fields that say how tensors are compressed rather than where they live: the Hydra app sets them
# through its `compression` group, not `policy`, and the backend through `compression=<preset>`.
COMPRESSION_FIELDS = ("compress_weight", "comp_weight_config", "compress_cache", "comp_cache_config", "native_weights")
COMPRESSIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "4bit-weights": dict(compress_weight=True, comp_weight_config=CompressionConfig(4, 64, 0)),
    "4bit-weights-input": dict(compress_weight=True, comp_weight_config=CompressionConfig(4, 64, 1)),
    "4bit-weights-gptq": dict(compress_weight=True, comp_weight_config=CompressionConfig(4, 64, 1, "gptq")),
    "4bit-weights-int4mm": dict(compress_weight=True, comp_weight_config=CompressionConfig(4, 64, 1, kernel="int4mm")),
    "8bit-weights": dict(compress_weight=True, comp_weight_config=CompressionConfig(8, 64, 1)),
    "4bit-cache": dict(compress_cache=True, comp_cache_config=CompressionConfig(4, 64, -1)),
    "native": dict(native_weights=True),
    "4bit": dict(
        compress_weight=True,
        comp_weight_config=CompressionConfig(4, 64, 0),
        compress_cache=True,
        comp_cache_config=CompressionConfig(4, 64, -1),
    ),
    "8bit": dict(
        compress_weight=True,
        comp_weight_config=CompressionConfig(8, 64, 1),
        compress_cache=True,
        comp_cache_config=CompressionConfig(8, 64, -1),
    ),
}


def compression_fields(preset: str) -> dict[str, Any]:
    if preset not in COMPRESSIONS:
        raise FlexevalError(f"compression: unknown preset {preset!r}; presets: {', '.join(COMPRESSIONS)}")
    return dict(COMPRESSIONS[preset])


KINDS = {int: "an integer", float: "a number", bool: "true or false"}  # a field's type, in words


def _convert(name: str, value: Any, kind: type) -> Any:
    if kind is CompressionConfig:
        return _compression_config(name, value)
    if value is None or (isinstance(value, bool) and kind is not bool):  # lm-eval reads "none" and "true" so
        raise FlexevalError(f"policy: {name} must be {KINDS[kind]}, got {value!r}")
    if not isinstance(value, str):
        return kind(value) if kind is float and isinstance(value, int) else value
    text = value.strip().lower()
    try:
        if kind is bool:
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise FlexevalError(f"policy: {name} must be {KINDS[kind]}, got {value!r}") from None


def _compression_config(name: str, value: Any) -> CompressionConfig:
    """A CompressionConfig, a mapping of its fields, or 'bits:group_size:group_dim[:fit[:kernel]]'
    (command lines)."""
    if isinstance(value, CompressionConfig):
        return value
    if isinstance(value, Mapping):
        return CompressionConfig(**value)
    parts = str(value).split(":")
    try:
        if len(parts) not in (3, 4, 5):
            raise ValueError
        bits, size, dim = (int(part) for part in parts[:3])
    except ValueError:
        raise FlexevalError(
            f"policy: {name} takes bits:group_size:group_dim[:fit[:kernel]] such as 4:64:0, 4:128:1:mse or "
            f"4:64:1:minmax:int4mm, got {value!r}"
        ) from None
    return CompressionConfig(bits, size, dim, *parts[3:])
