"""The OPT family (Meta's OPT-125m … OPT-175B and OPT-IML).

Its quirks: learned absolute positions stored with an offset of two, LayerNorm with biases,
ReLU, biases everywhere, queries scaled before the dot product. OPT-350m alone projects
embeddings in and out of a narrower width and normalises after each sub-block (post-LN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch.nn.functional as F
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
    embed_tokens,
    gather_rows,
    layer_norm,
    linear,
    split_heads,
    unembedding,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODEL_TYPES = ("opt",)
POSITION_OFFSET = 2  # OPT's position table reserves its first two rows
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which OPT uses


@dataclass(frozen=True)
class OPTConfig:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    context_length: int
    word_embed_proj_dim: int
    pre_norm: bool  # do_layer_norm_before; False only for opt-350m
    final_norm: bool
    bias: bool
    activation: Callable[[Tensor], Tensor]  # resolved once: ACT2FN builds a new module per lookup
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def projects(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> OPTConfig:
        from transformers.activations import ACT2FN

        if not getattr(hf, "layer_norm_elementwise_affine", True):
            raise FlexevalError("OPT without LayerNorm weights (layer_norm_elementwise_affine=False) is not supported")
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            ffn_dim=hf.ffn_dim,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            context_length=hf.max_position_embeddings,
            word_embed_proj_dim=hf.word_embed_proj_dim or hf.hidden_size,
            pre_norm=hf.do_layer_norm_before,
            final_norm=hf.do_layer_norm_before and not getattr(hf, "_remove_final_layer_norm", False),
            bias=getattr(hf, "enable_bias", True),
            activation=ACT2FN[hf.activation_function],
            tie_word_embeddings=bool(hf.tie_word_embeddings),
        )


def embed(cfg: OPTConfig, w: Weights, h: Tensor | None, step: Step, cache: Cache | None) -> Tensor:
    x = embed_tokens(w, "tokens", step.ids)  # (b, s, word_embed_proj_dim)
    if cfg.projects:
        x = linear(x, w["project_in"], None, step.gemm_rows)  # (b, s, d)
    return x + F.embedding(step.positions + POSITION_OFFSET, w["positions"])


def residual(cfg: OPTConfig, w: Weights, h: Tensor, sublayer) -> Tensor:
    """Pre-LN: h + f(norm(h)); post-LN (opt-350m): norm(h + f(h))."""
    if cfg.pre_norm:
        return h + sublayer(layer_norm(h, w["norm"], w["norm_bias"], LAYER_NORM_EPS))
    return layer_norm(h + sublayer(h), w["norm"], w["norm_bias"], LAYER_NORM_EPS)


def attention(cfg: OPTConfig, w: Weights, h: Tensor, step: Step, cache: Cache | None) -> Tensor:
    def attn(x: Tensor) -> Tensor:
        q, k, v = linear(x, w["wqkv"], w.get("bqkv"), step.gemm_rows).chunk(3, dim=-1)
        q = q * cfg.head_dim**-0.5  # OPT scales queries, bias included, before the dot product
        q, k, v = (split_heads(t, cfg.head_dim) for t in (q, k, v))  # (b, heads, s, head_dim)
        return linear(attend(q, k, v, step, cache, scale=1.0), w["wo"], w.get("bo"), step.gemm_rows)

    return residual(cfg, w, h, attn)


def mlp(cfg: OPTConfig, w: Weights, h: Tensor, step: Step, cache: Cache | None) -> Tensor:
    def feed_forward(x: Tensor) -> Tensor:
        inner = cfg.activation(linear(x, w["fc1"], w.get("b1"), step.gemm_rows))  # (b, s, ffn_dim)
        return linear(inner, w["fc2"], w.get("b2"), step.gemm_rows)

    return residual(cfg, w, h, feed_forward)


def head(cfg: OPTConfig, w: Weights, h: Tensor, step: Step, cache: Cache | None) -> Tensor:
    x = gather_rows(h, step)  # (n, d)
    if cfg.final_norm:
        x = layer_norm(x, w["norm"], w["norm_bias"], LAYER_NORM_EPS)
    if cfg.projects:
        x = linear(x, w["project_out"], None, step.gemm_rows)  # (n, word_embed_proj_dim)
    return x  # the unembedding's input


def build(hf: PretrainedConfig) -> Model:
    """The model as a list of layers, each with the checkpoint tensors it is assembled from."""
    cfg = OPTConfig.from_hf(hf)
    d, proj = cfg.hidden_size, cfg.word_embed_proj_dim
    top = "model.decoder."

    def linear(weight: str, bias: str, out_dim: int, in_dim: int, *sources: str) -> dict[str, Param]:
        params = {weight: Param((out_dim, in_dim), tuple(s + ".weight" for s in sources))}
        if cfg.bias:
            params[bias] = Param((out_dim,), tuple(s + ".bias" for s in sources))
        return params

    def norm(source: str) -> dict[str, Param]:
        return {"norm": Param((d,), (source + ".weight",)), "norm_bias": Param((d,), (source + ".bias",))}

    embedding = top + "embed_tokens.weight"
    embed_params = {
        "tokens": Param((cfg.vocab_size, proj), (embedding,), by_token=True),
        "positions": Param((cfg.context_length + POSITION_OFFSET, d), (top + "embed_positions.weight",)),
    }
    if cfg.projects:
        embed_params["project_in"] = Param((d, proj), (top + "project_in.weight",))
    layers = [Layer("embed", "embed", embed_params, partial(embed, cfg))]

    for i in range(cfg.num_layers):
        pre = f"{top}layers.{i}."
        attn = norm(pre + "self_attn_layer_norm")
        attn |= linear("wqkv", "bqkv", 3 * d, d, *(f"{pre}self_attn.{n}_proj" for n in "qkv"))
        attn |= linear("wo", "bo", d, d, pre + "self_attn.out_proj")
        ffn = norm(pre + "final_layer_norm") | linear("fc1", "b1", cfg.ffn_dim, d, pre + "fc1")
        ffn |= linear("fc2", "b2", d, cfg.ffn_dim, pre + "fc2")
        layers.append(Layer(f"layers.{i}.attention", "attention", attn, partial(attention, cfg), block=i))
        layers.append(Layer(f"layers.{i}.mlp", "mlp", ffn, partial(mlp, cfg)))

    head_params = norm(top + "final_layer_norm") if cfg.final_norm else {}
    if cfg.projects:
        head_params["project_out"] = Param((proj, d), (top + "project_out.weight",))
    layers.append(Layer("head", "head", head_params, partial(head, cfg)))
    layers.append(unembedding(cfg.vocab_size, proj, embedding if cfg.tie_word_embeddings else "lm_head.weight"))

    return Model(
        family="opt",
        layers=tuple(layers),
        num_blocks=cfg.num_layers,
        kv_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        context_length=cfg.context_length,
        ignored_sources=frozenset({"lm_head.weight"} if cfg.tie_word_embeddings else ()),
    )
