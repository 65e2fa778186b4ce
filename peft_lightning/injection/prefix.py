"""Attention-level prefix injection: the one mechanism every prefix method uses.

Why not `past_key_values`? transformers' Cache API changes between releases (and breaks HF peft),
DeBERTa has no cache path, a cache shifts the real tokens' position ids by the prefix length, and
prefixes passed as a cache are dropped under activation checkpointing. Instead we register our own
entry in transformers' `AttentionInterface`. Every attention module of a supported architecture
calls it with its already-projected (and, for RoPE models, already-rotated) query, key and value;
we join the learned prefix keys/values in front of the real ones, extend the mask so every real
token may attend to the prefix, and hand over to the stock SDPA or the model's own eager kernel.

The prefix itself travels as a forward keyword argument (`peft_prefix=PrefixState(...)`), which
transformers passes untouched down to the attention call. That keeps the mechanism stateless:
activation checkpointing re-runs the layer with the same keyword arguments, so the recomputed
forward sees the same prefix and gradients reach it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

PREFIX_KWARG = "peft_prefix"
SLOT_ATTR = "_peft_prefix_slot"  # set on each attention module that can take a prefix
IMPLEMENTATIONS = {"sdpa": "peft_prefix_sdpa", "eager": "peft_prefix_eager"}

# Self-attention module classes per architecture (`config.model_type`). Cross-attention modules
# get their own slots where a method wants them (encoder-decoder models, later).
SELF_ATTENTION_CLASSES: dict[str, tuple[str, ...]] = {
    "bert": ("BertSelfAttention",),
    "roberta": ("RobertaSelfAttention",),
}


@dataclass
class PrefixState:
    """Per-slot prefix keys/values for one forward pass.

    keys[slot] / values[slot]: (batch or 1, kv_heads, prefix_length, head_dim).
    mask: (batch, prefix_length) bool, True where the prefix may be attended to; None = all.
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    mask: torch.Tensor | None = None


def supported_architectures() -> list[str]:
    return sorted(SELF_ATTENTION_CLASSES)


def attention_modules(model: nn.Module, model_type: str) -> list[nn.Module]:
    """The self-attention modules of `model` in layer order."""
    if model_type not in SELF_ATTENTION_CLASSES:
        raise ValueError(
            f"Prefix injection does not support model_type '{model_type}'. "
            f"Supported: {', '.join(supported_architectures())}."
        )
    names = SELF_ATTENTION_CLASSES[model_type]
    return [m for m in model.modules() if type(m).__name__ in names]


def install_prefix_attention(model: PreTrainedModel) -> int:
    """Route `model`'s attention through the prefix-aware kernel; returns the number of slots.

    Without a `peft_prefix` keyword at forward time the model computes exactly what it did before.
    """
    base = model.config._attn_implementation
    if base in IMPLEMENTATIONS.values():  # already installed
        return sum(1 for m in model.modules() if hasattr(m, SLOT_ATTR))
    if base not in IMPLEMENTATIONS:
        raise ValueError(
            f"Prefix injection supports attn_implementation 'sdpa' or 'eager', got '{base}'. "
            "Set model.attn_implementation in the config."
        )
    modules = attention_modules(model, model.config.model_type)
    for slot, module in enumerate(modules):
        setattr(module, SLOT_ATTR, slot)
    model.set_attn_implementation(IMPLEMENTATIONS[base])
    return len(modules)


def _prefix_columns(state: PrefixState, batch: int, device) -> torch.Tensor:
    """(batch, P) bool: which prefix positions each example may attend to."""
    any_key = next(iter(state.keys.values()))
    p = any_key.shape[-2]
    if state.mask is None:
        return torch.ones(batch, p, dtype=torch.bool, device=device)
    return state.mask.to(device=device, dtype=torch.bool).expand(batch, p)


def extend_attention_mask(
    mask: torch.Tensor | None,
    prefix_cols: torch.Tensor,
    query_len: int,
    key_len: int,
    causal: bool,
    dtype: torch.dtype,
    additive: bool,
) -> torch.Tensor | None:
    """Prepend prefix columns to a 4D attention mask in the format the kernel expects.

    `mask` is None (no padding), boolean (SDPA: True = attend) or additive float (eager).
    A mask built from None is boolean, or additive in `dtype` when the kernel adds it (eager).
    Real tokens always see every unmasked prefix position, whatever the causal structure.
    """
    batch, p = prefix_cols.shape
    device = prefix_cols.device
    if mask is None:
        if not causal and bool(prefix_cols.all()):
            return None  # every position attends everywhere: no mask needed
        mask = torch.ones(query_len, key_len, dtype=torch.bool, device=device)
        if causal:  # bottom-right aligned, as with a cache
            mask = torch.tril(mask, diagonal=key_len - query_len)
        mask = mask[None, None]
        if additive:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    cols = prefix_cols[:, None, None, :].expand(batch, 1, mask.shape[-2], p)
    if mask.dtype == torch.bool:
        return torch.cat([cols, mask.expand(batch, -1, -1, -1)], dim=-1)
    blocked = torch.finfo(mask.dtype).min
    cols = torch.zeros(cols.shape, dtype=mask.dtype, device=device).masked_fill(~cols, blocked)
    return torch.cat([cols, mask.expand(batch, -1, -1, -1)], dim=-1)


def _with_prefix(module, query, key, value, attention_mask, kwargs, additive: bool):
    state: PrefixState | None = kwargs.pop(PREFIX_KWARG, None)
    slot = getattr(module, SLOT_ATTR, None)
    if state is None or slot is None or slot not in state.keys:
        return key, value, attention_mask
    batch = query.shape[0]
    pk = state.keys[slot].to(key.dtype).expand(batch, -1, -1, -1)
    pv = state.values[slot].to(value.dtype).expand(batch, -1, -1, -1)
    causal = bool(getattr(module, "is_causal", False)) and kwargs.get("is_causal", True) is not False
    key_len = key.shape[-2]
    key = torch.cat([pk, key], dim=-2)
    value = torch.cat([pv, value], dim=-2)
    if attention_mask is not None or state.mask is not None or causal:
        # (an encoder without padding or prefix mask needs no mask at all: skip building one)
        cols = _prefix_columns(state, batch, query.device)
        attention_mask = extend_attention_mask(
            attention_mask, cols, query.shape[-2], key_len, causal, query.dtype, additive
        )
    kwargs["is_causal"] = False  # the mask (or its absence, for encoders) now says everything
    return key, value, attention_mask


def prefix_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    key, value, attention_mask = _with_prefix(module, query, key, value, attention_mask, kwargs, additive=False)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def prefix_eager_attention(module, query, key, value, attention_mask, **kwargs):
    key, value, attention_mask = _with_prefix(module, query, key, value, attention_mask, kwargs, additive=True)
    kwargs.pop("is_causal", None)
    # The model's own eager kernel (every transformers 5 modeling file defines one), so details
    # such as GQA head repetition or softcapping stay the model's.
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATIONS["sdpa"], prefix_sdpa_attention)
AttentionInterface.register(IMPLEMENTATIONS["eager"], prefix_eager_attention)
# Masks are built exactly as for the underlying kernel.
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATIONS["sdpa"], sdpa_mask)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATIONS["eager"], eager_mask)
