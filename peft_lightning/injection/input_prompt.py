"""Input-level prompts: learned vectors placed in front of the real tokens' embeddings.

The vectors are joined to the *output* of the backbone's embedding module, so the real tokens'
embeddings, position ids and token types are computed exactly as without a prompt (no shift by
the prompt length, no overflow of max positions). Callers extend the attention mask by the prompt
length and drop the prompt positions from the output (`strip`), so token-level outputs stay
aligned with the input tokens.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

EMBEDDING_MODULES = {"bert": "embeddings", "roberta": "embeddings"}


class InputPrompt:
    def __init__(self, model: nn.Module, model_type: str):
        if model_type not in EMBEDDING_MODULES:
            raise ValueError(
                f"Input-level prompts do not support model_type '{model_type}'. "
                f"Supported: {', '.join(sorted(EMBEDDING_MODULES))}."
            )
        self.module = model.get_submodule(EMBEDDING_MODULES[model_type])
        self._prompt: torch.Tensor | None = None
        self.module.register_forward_hook(self._prepend)

    def _prepend(self, module, args, output):
        if self._prompt is None:
            return output
        prompt = self._prompt.to(output.dtype).expand(output.shape[0], -1, -1)
        return torch.cat([prompt, output], dim=1)

    @contextmanager
    def prepended(self, prompt: torch.Tensor):
        """Within the block, the embedding module's output starts with `prompt` (P, hidden)."""
        self._prompt = prompt
        try:
            yield
        finally:
            self._prompt = None

    @staticmethod
    def extend_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
        ones = attention_mask.new_ones(attention_mask.shape[0], length)
        return torch.cat([ones, attention_mask], dim=1)

    @staticmethod
    def strip(hidden: torch.Tensor, length: int) -> torch.Tensor:
        return hidden[:, length:]
