"""Converting a GGUF file (llama.cpp's format) into a dense safetensors checkpoint directory.

transformers already knows how to dequantize GGUF and undo llama.cpp's tensor renaming and
q/k permutation; we let it build the model once and keep only its dense state dict, config and
tokenizer. `save_pretrained` refuses GGUF-loaded models, so the weights go through safetensors
directly. The result reloads in well under a second, against ~25 s for the conversion.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def convert_gguf(gguf_file: Path, directory: Path) -> None:
    """Write config.json, tokenizer files and model.safetensors for `gguf_file` into `directory`."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same storage as the embedding; safetensors stores it once
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    del model.config.quantization_config  # the weights are dense now; other loaders must not treat them as GGUF
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
