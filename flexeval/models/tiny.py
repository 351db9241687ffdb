"""Tiny random-initialised models of every supported family, for tests that must run offline.

Each is built by transformers itself from a small config (so it is a real checkpoint of that
family, written with safetensors), deterministically from a seed, with a byte-level tokenizer
that needs no download: every byte is one token, plus `<s>` and `</s>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS = 256, 257
VOCAB = 258
# Larger than transformers' 0.02 so that random logits are far from uniform and greedy
# decoding is not decided by rounding noise.
INIT_STD = 0.2

_COMMON = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
_LLAMA = dict(
    _COMMON,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=INIT_STD,
)
_OPT = dict(
    _COMMON,
    hidden_size=64,
    ffn_dim=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    init_std=INIT_STD,
)

# name -> transformers' model_type and config values: plain data, so that listing the names
# imports no transformers
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-opt": ("opt", dict(_OPT, word_embed_proj_dim=64, do_layer_norm_before=True)),
    "tiny-opt-350m": ("opt", dict(_OPT, word_embed_proj_dim=32, do_layer_norm_before=False)),
    "tiny-llama": ("llama", dict(_LLAMA, num_key_value_heads=4, tie_word_embeddings=False)),
    "tiny-llama-gqa": (
        "llama",
        dict(
            _LLAMA,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "tiny-qwen2": (
        "qwen2",
        dict(
            _LLAMA,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "tiny-mistral": ("mistral", dict(_LLAMA, num_key_value_heads=2, sliding_window=16)),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}  # token id == byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


# A random Llama of 134 MB (fp32): large enough that a budget of a tenth of it is measurable in
# a process's resident memory, small enough to run in seconds (`flexeval.auto_memory`)
WIDE_LLAMA = (
    "llama",
    dict(
        _COMMON,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
)


def write_tiny(name: str, directory: Path, seed: int = 0) -> None:
    """Write the tiny model `name` (a key of CONFIGS), initialised from `seed`, as a checkpoint."""
    write(*CONFIGS[name], directory, seed)


def write(model_type: str, values: dict[str, Any], directory: Path, seed: int = 0) -> None:
    """A random model of transformers' `model_type` with config `values` and the byte tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values), dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer = byte_tokenizer()
    if len(tokenizer) != VOCAB:
        raise RuntimeError(f"the byte tokenizer has {len(tokenizer)} tokens, not {VOCAB}")
    tokenizer.save_pretrained(directory)
