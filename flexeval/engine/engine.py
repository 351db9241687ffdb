"""`Engine`: a loaded model that scores and generates token sequences.

The engine runs the model's layers in order over one padded batch, with each layer's weights
passed in as arguments; it owns the padding, the masks, the KV cache and the readout of the
head (log-probabilities of given tokens, or the next token), so models stay pure layer math.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from flexeval.engine.batch import TokenSeq, as_token_lists, attention_mask, left_pad, positions
from flexeval.engine.sampling import Sampling, pick_tokens
from flexeval.errors import FlexevalError
from flexeval.models import registry
from flexeval.models.checkpoint import Checkpoint, load_weights
from flexeval.models.common import KVCache, Model, Step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlexevalError(f"device {device} requested but CUDA is not available: use device='cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise FlexevalError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise FlexevalError(f"unsupported dtype {dtype}: use one of {', '.join(DTYPES)}")
    if dtype == torch.float16 and device.type == "cpu":
        raise FlexevalError("float16 is not supported on CPU (slow and overflow-prone there): use bfloat16")
    return dtype


class Engine:
    """A model with its weights on one device, ready to score and generate."""

    def __init__(
        self,
        model: Model,
        weights: list[dict[str, Tensor]],
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.weights = weights
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(
        cls,
        spec: str | Path = registry.DEFAULT_MODEL,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device | None = None,
        cache_dir: str | Path | None = None,
    ) -> Engine:
        """Load a model spec (a registered name, a checkpoint directory or a hub id)."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        directory = registry.resolve(str(spec), cache_dir)
        model = registry.build_model(directory)
        tokenizer = registry.load_tokenizer(directory)
        weights = load_weights(model, Checkpoint(directory), dtype, device)
        return cls(model, weights, tokenizer, device, dtype)

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @torch.inference_mode()
    def logprobs(self, sequences: Sequence[TokenSeq]) -> list[Tensor]:
        """lp[i][t] = log p(sequences[i][t + 1] | sequences[i][: t + 1]), as float32 on the CPU."""
        seqs = as_token_lists(sequences, self.model.vocab_size, "logprobs")
        # the last token is only ever a target, so the model reads each sequence but its last token
        self._check_positions([len(s) - 1 for s in seqs], "logprobs")
        inputs = left_pad([s[:-1] for s in seqs], self.device)
        if inputs.width == 0:
            return [torch.empty(0) for _ in seqs]
        rows = inputs.valid.flatten().nonzero().squeeze(1)  # every real input token predicts one target
        targets = left_pad([s[1:] for s in seqs], self.device).ids.flatten()[rows]

        def readout(logits: Tensor, chunk: slice) -> Tensor:
            return logits.log_softmax(-1).gather(1, targets[chunk, None]).squeeze(1)

        step = self._step(inputs.ids, positions(inputs.valid), inputs.valid, 0, rows, readout)
        out = self._forward(step, caches=None).cpu()
        return list(out.split(inputs.lengths.tolist()))

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[TokenSeq],
        max_new_tokens: int | Sequence[int] = 32,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """New token ids for each prompt: greedy unless temperature > 0.

        A sequence ends after `max_new_tokens` (one number, or one per prompt) or with a stop
        token (default: the tokenizer's end-of-sequence), which is included in its output.
        """
        seqs = as_token_lists(prompts, self.model.vocab_size, "generate")
        budgets = self._budgets(max_new_tokens, len(seqs))
        sampling = Sampling(temperature, top_k, top_p, seed)
        # the last new token is only returned, never fed back, so it needs no position
        self._check_positions([len(s) + max(int(n) - 1, 0) for s, n in zip(seqs, budgets)], "generate")
        stops = torch.tensor(self._stop_ids(stop_token_ids), dtype=torch.long)
        generator = None if sampling.greedy else torch.Generator(self.device).manual_seed(seed)

        batch = left_pad(seqs, self.device)
        b, width, steps = len(seqs), batch.width, int(budgets.max())
        caches = self._allocate_cache(b, width + steps)
        valid = torch.zeros(b, width + steps, dtype=torch.bool, device=self.device)
        valid[:, :width] = batch.valid
        pos = positions(batch.valid)

        def readout(logits: Tensor, chunk: slice) -> Tensor:
            return pick_tokens(logits, sampling, generator)

        last = torch.arange(b, device=self.device) * width + width - 1
        step = self._step(batch.ids, pos, batch.valid, 0, last, readout)
        outputs: list[list[int]] = [[] for _ in range(b)]
        running = budgets > 0
        for t in range(steps):
            if not running.any():
                break
            tokens = self._forward(step, caches)
            chosen = tokens.cpu()
            for i in running.nonzero().squeeze(1).tolist():
                outputs[i].append(int(chosen[i]))
            running &= (budgets > t + 1) & ~torch.isin(chosen, stops)
            column = width + t
            valid[:, column] = True
            pos = pos[:, -1:] + 1
            step = self._step(
                tokens[:, None], pos, valid[:, : column + 1], column, torch.arange(b, device=self.device), readout
            )
        return outputs

    def _forward(self, step: Step, caches: dict[int, KVCache] | None) -> Tensor:
        h = None
        for layer, w in zip(self.model.layers, self.weights):
            cache = caches[layer.block] if caches is not None and layer.block is not None else None
            h = layer.forward(w, h, step, cache)
        return h

    def _step(
        self,
        ids: Tensor,
        pos: Tensor,
        valid_keys: Tensor,
        cache_start: int,
        head_rows: Tensor,
        readout: Callable[[Tensor, slice], Tensor],
    ) -> Step:
        rope = self.model.rotary(pos, self.dtype) if self.model.rotary else None
        mask = attention_mask(valid_keys, ids.shape[1], self.model.sliding_window)
        return Step(ids, pos, mask, cache_start, head_rows, readout, rope)

    def _allocate_cache(self, batch_size: int, length: int) -> dict[int, KVCache]:
        shape = (batch_size, self.model.kv_heads, length, self.model.head_dim)
        return {
            layer.block: KVCache(
                torch.empty(shape, dtype=self.dtype, device=self.device),
                torch.empty(shape, dtype=self.dtype, device=self.device),
            )
            for layer in self.model.layers
            if layer.block is not None
        }

    def _budgets(self, max_new_tokens: int | Sequence[int], n: int) -> Tensor:
        budgets = torch.as_tensor(max_new_tokens, dtype=torch.long).flatten()
        if budgets.numel() == 1:
            budgets = budgets.expand(n)
        if budgets.numel() != n:
            raise FlexevalError(
                f"max_new_tokens has {budgets.numel()} entries for {n} prompts: give one or one per prompt"
            )
        if (budgets < 0).any():
            raise FlexevalError(f"max_new_tokens must be >= 0, got {budgets.min().item()}")
        return budgets

    def _check_positions(self, needed: Sequence[int], what: str) -> None:
        for i, n in enumerate(needed):
            if n > self.context_length:
                raise FlexevalError(
                    f"{what}: sequence {i} needs {n} positions but the model's context window is "
                    f"{self.context_length} tokens; shorten it"
                    + (" or generate fewer tokens" if what == "generate" else "")
                )

    def _stop_ids(self, stop_token_ids: Sequence[int] | None) -> list[int]:
        if stop_token_ids is not None:
            return list(stop_token_ids)
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]
