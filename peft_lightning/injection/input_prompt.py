"""Input-level prompts: learned vectors placed in front of the real tokens' embeddings.

The vectors are joined to the output of the architecture's embedding module (see
`architectures.py`), so the real tokens' embeddings, position ids and token types are computed
exactly as without a prompt: no shift by the prompt length, no overflow of max positions.
Decoders (GPT-2, Llama) derive positions and output shapes from the input length: there we embed
the tokens ourselves and pass `inputs_embeds` with the real tokens' position ids (the prompt
positions get position id 0); where it adds position embeddings after our join (BART's encoder) the
prompt positions get none. The caller's outputs are stripped of the prompt positions, so
token-level outputs stay aligned with the input tokens (and labels).

The hook fires once per `prepended` block: encoder-decoders share one embedding table between
encoder and decoder, and only the encoder (called first) gets the prompt.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from peft_lightning.injection.architectures import architecture


class InputPrompt:
    def __init__(self, model: nn.Module):
        self.arch = architecture(model.config.model_type, "Input-level prompts")
        self.embedding = model.get_input_embeddings()
        self._prompt: torch.Tensor | None = None  # waiting for the embedding module's next call
        self._joined_length = 0  # prompt length joined in this forward, for the positions hook
        if self.arch.prompt_module is not None:
            # (module paths are relative to the bare model, also inside an LM wrapper)
            module = model.base_model.get_submodule(self.arch.prompt_module)
            module.register_forward_pre_hook(self._crop_mask, with_kwargs=True)
            module.register_forward_hook(self._prepend)
        if self.arch.positions_module:
            model.base_model.get_submodule(self.arch.positions_module).register_forward_hook(self._skip_positions)

    def _crop_mask(self, module, args, kwargs):
        key = self.arch.embedding_mask_kwarg
        if self._prompt is not None and key and kwargs.get(key) is not None:
            kwargs[key] = kwargs[key][:, self._prompt.shape[-2]:]  # the embedding sees real tokens only
        return args, kwargs

    def _prepend(self, module, args, output):
        if self._prompt is None:
            return output
        prompt, self._prompt = self._prompt, None
        self._joined_length = prompt.shape[-2]
        return torch.cat([prompt.to(output.dtype).expand(output.shape[0], -1, -1), output], dim=1)

    def _skip_positions(self, module, args, output):
        p, self._joined_length = self._joined_length, 0
        if not p:
            return output
        real = output.narrow(-2, 0, output.shape[-2] - p)  # positions 0..L-1 for the real tokens
        return torch.cat([real.new_zeros(*real.shape[:-2], p, real.shape[-1]), real], dim=-2)

    @contextmanager
    def prepended(self, inputs: dict[str, torch.Tensor], prompt: torch.Tensor):
        """Backbone inputs with `prompt` ((P, hidden) or (batch, P, hidden)) in front of the real
        tokens, valid inside the block: a longer attention mask (every example sees its prompt)
        and either a pending join at the embedding module or, for decoders, `inputs_embeds` with
        the real tokens' own position ids."""
        inputs = dict(inputs)
        length = prompt.shape[-2]
        mask = inputs["attention_mask"]
        inputs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)
        if self.arch.prompt_module is None:
            embeds = self.embedding(inputs.pop("input_ids"))
            prompt = prompt.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
            inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
            real = torch.arange(mask.shape[1], device=mask.device)
            inputs["position_ids"] = torch.cat([real.new_zeros(length), real])[None].expand(mask.shape[0], -1)
            yield inputs
            return
        self._prompt = prompt
        try:
            yield inputs
        finally:
            self._prompt, self._joined_length = None, 0

    def strip(self, hidden: torch.Tensor, length: int) -> torch.Tensor:
        """Drop the prompt positions (an encoder-decoder's decoder output has none)."""
        return hidden if self.arch.kind == "encoder-decoder" else hidden[:, length:]
