"""The Llama family: Llama 2/3, SmolLM2, TinyLlama, Mistral and Qwen2.

Pre-RMSNorm blocks, rotary positions, SwiGLU MLP, grouped-query attention. Qwen2 adds q/k/v
biases, Mistral a sliding attention window; both are Llama otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flexeval.errors import FlexevalError
from flexeval.models.attention import attend
from flexeval.models.common import (
    Cache,
    Layer,
    Model,
    Param,
    Step,
    Weights,
    apply_rotary,
    embed_tokens,
    gather_rows,
    linear,
    rms_norm,
    rotary_tables,
    split_heads,
    unembedding,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants whose frequencies do not depend on the sequence length being processed.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    context_length: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: Callable[[Tensor], Tensor]  # resolved once: ACT2FN builds a new module per lookup
    rope_inv_freq: tuple[float, ...]
    rope_scale: float
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> LlamaConfig:
        from transformers.activations import ACT2FN
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope = dict(hf.rope_parameters or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise FlexevalError(f"rope type {rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if rope_type == "default":
            inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scale = 1.0
        else:
            inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
        if "sliding_attention" in (getattr(hf, "layer_types", None) or ()):
            raise FlexevalError(f"{hf.model_type}: per-layer sliding-window attention is not supported")
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            context_length=hf.max_position_embeddings,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=attention_bias or hf.model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            hidden_act=ACT2FN[hf.hidden_act],
            rope_inv_freq=tuple(inv_freq.tolist()),
            rope_scale=float(scale),
            sliding_window=getattr(hf, "sliding_window", None) if hf.model_type == "mistral" else None,
        )


def embed(w: Weights, h: Tensor | None, step: Step, cache: Cache | None) -> Tensor:
    return embed_tokens(w, "tokens", step.ids)  # (b, s, d)


def attention(cfg: LlamaConfig, w: Weights, h: Tensor, step: Step, cache: Cache | None) -> Tensor:
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    x = rms_norm(h, w["norm"], cfg.rms_norm_eps)
    q, k, v = linear(x, w["wqkv"], w.get("bqkv"), step.gemm_rows).split((q_size, kv_size, kv_size), dim=-1)
    q, k, v = (split_heads(t, cfg.head_dim) for t in (q, k, v))  # (b, heads, s, head_dim)
    cos, sin = step.rope
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return h + linear(attend(q, k, v, step, cache), w["wo"], w.get("bo"), step.gemm_rows)


def mlp(cfg: LlamaConfig, w: Weights, h: Tensor, step: Step, cache: Cache | None) -> Tensor:
    x = rms_norm(h, w["norm"], cfg.rms_norm_eps)
    gate, up = linear(x, w["w13"], w.get("b13"), step.gemm_rows).chunk(2, dim=-1)  # (b, s, intermediate) each
    inner = cfg.hidden_act(gate).mul_(up)
    del gate, up  # the fused product (twice the intermediate width) is freed before the down projection
    return h + linear(inner, w["w2"], w.get("b2"), step.gemm_rows)


def head(cfg: LlamaConfig, w: Weights, h: Tensor, step: Step, cache: Cache | None) -> Tensor:
    return rms_norm(gather_rows(h, step), w["norm"], cfg.rms_norm_eps)  # (n, d): the unembedding's input


def build(hf: PretrainedConfig) -> Model:
    """The model as a list of layers, each with the checkpoint tensors it is assembled from."""
    cfg = LlamaConfig.from_hf(hf)
    d, q_size, kv_size = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def param(shape: tuple[int, ...], *sources: str) -> Param:
        return Param(shape, sources)

    def blocks(i: int) -> tuple[Layer, Layer]:
        pre = f"model.layers.{i}."
        qkv = [f"{pre}self_attn.{n}_proj" for n in "qkv"]
        attn = {
            "norm": param((d,), pre + "input_layernorm.weight"),
            "wqkv": param((q_size + 2 * kv_size, d), *(n + ".weight" for n in qkv)),
            "wo": param((d, q_size), pre + "self_attn.o_proj.weight"),
        }
        if cfg.qkv_bias:
            attn["bqkv"] = param((q_size + 2 * kv_size,), *(n + ".bias" for n in qkv))
        if cfg.o_bias:
            attn["bo"] = param((d,), pre + "self_attn.o_proj.bias")
        gate_up = [f"{pre}mlp.{n}_proj" for n in ("gate", "up")]
        ffn = {
            "norm": param((d,), pre + "post_attention_layernorm.weight"),
            "w13": param((2 * cfg.intermediate_size, d), *(n + ".weight" for n in gate_up)),
            "w2": param((d, cfg.intermediate_size), pre + "mlp.down_proj.weight"),
        }
        if cfg.mlp_bias:
            ffn["b13"] = param((2 * cfg.intermediate_size,), *(n + ".bias" for n in gate_up))
            ffn["b2"] = param((d,), pre + "mlp.down_proj.bias")
        return (
            Layer(f"layers.{i}.attention", "attention", attn, partial(attention, cfg), block=i),
            Layer(f"layers.{i}.mlp", "mlp", ffn, partial(mlp, cfg)),
        )

    embedding = "model.embed_tokens.weight"
    lm_head = embedding if cfg.tie_word_embeddings else "lm_head.weight"
    layers = [Layer("embed", "embed", {"tokens": Param((cfg.vocab_size, d), (embedding,), by_token=True)}, embed)]
    for i in range(cfg.num_layers):
        layers.extend(blocks(i))
    layers.append(Layer("head", "head", {"norm": param((d,), "model.norm.weight")}, partial(head, cfg)))
    layers.append(unembedding(cfg.vocab_size, d, lm_head))

    inv_freq = torch.tensor(cfg.rope_inv_freq)
    return Model(
        family=hf.model_type,  # llama, mistral or qwen2: what messages call it
        layers=tuple(layers),
        num_blocks=cfg.num_layers,
        kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        context_length=cfg.context_length,
        sliding_window=cfg.sliding_window,
        rotary=lambda positions, dtype: rotary_tables(positions, inv_freq, cfg.rope_scale, dtype),
        ignored_sources=frozenset({"lm_head.weight"} if cfg.tie_word_embeddings else ()),
    )
