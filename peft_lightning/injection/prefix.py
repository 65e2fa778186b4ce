"""Attention-level prefix injection: the one mechanism every prefix method uses.

Why not `past_key_values`? transformers' Cache API changes between releases (and breaks HF peft),
DeBERTa has no cache path, a cache shifts the real tokens' position ids by the prefix length, and
prefixes passed as a cache are dropped under activation checkpointing. Instead we register our own
entry in transformers' `AttentionInterface`. Every attention module of a supported architecture
calls it with its already-projected (and, for RoPE models, already-rotated) query, key and value;
we join the learned prefix keys/values in front of the real ones, extend the mask so every real
token may attend to the prefix, and hand over to the stock SDPA or the model's own eager kernel.
Prefix keys are used as given: for RoPE models (Llama) they are never rotated (the prefix has no
position; the real tokens keep theirs, 0..L-1), which is also what a prefix handed over as
`past_key_values` gets in HF peft, since a cache holds already-rotated keys. The learned prefix
keys/values have the model's key/value heads (grouped-query models: fewer than query heads), and
the kernel repeats them with the real ones. tests/test_attention_reference.py checks all of this
against a hand-written attention.

The prefix itself travels as a forward keyword argument (`peft_prefix=PrefixState(...)`), which
transformers passes untouched down to the attention call. That keeps the mechanism stateless:
activation checkpointing re-runs the layer with the same keyword arguments, so the recomputed
forward sees the same prefix and gradients reach it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from peft_lightning import compat  # first: checks transformers' version and the internals imported below
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from peft_lightning.backbone import checkpointing
from peft_lightning.injection.architectures import AttentionSlot, attention_slots

PREFIX_KWARG = "peft_prefix"
SLOT_ATTR = "_peft_prefix_slot"  # set on each attention module that can take a prefix
STATE_ATTR = "_peft_prefix_state"  # architectures whose model drops extra keywords (DeBERTa)
RECOMPUTE_ATTR = "_peft_recompute_attention"  # set by `recompute_attention`
IMPLEMENTATIONS = {"sdpa": "peft_prefix_sdpa", "eager": "peft_prefix_eager"}


@dataclass
class PrefixState:
    """Per-slot prefix keys/values for one forward pass.

    keys[slot] / values[slot]: (batch or 1, kv_heads, prefix_length, head_dim).
    mask: (batch, prefix_length) bool, True where the prefix may be attended to; None = all.

    Every layer of a stack gets the same attention mask, so the prefix-extended mask is built
    once per forward and handed to every layer (`extended_mask`): it is remembered here, on the
    object that lives for one forward, keyed by the identity and version of the real mask (an
    encoder-decoder has three: encoder, decoder, cross) and everything else it depends on.
    Activation checkpointing replays a layer with the same mask object and the same state, so
    its recomputation gets the same extended mask without rebuilding it.
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    mask: torch.Tensor | None = None
    _masks: list = field(default_factory=list, init=False, repr=False, compare=False)

    def extended_mask(self, attention_mask: torch.Tensor | None, batch: int, query_len: int, key_len: int,
                      causal: bool, dtype: torch.dtype, additive: bool, device,
                      as_bool: bool = False) -> torch.Tensor | None:
        """`extend_attention_mask` of `attention_mask` (made boolean first if `as_bool`), once per
        distinct input: later calls with the same (identical, unmodified) real mask and arguments
        return the tensor built the first time."""
        def real():  # (on a cache hit, not computed at all)
            return attention_mask.bool() if as_bool and attention_mask is not None else attention_mask

        if torch.compiler.is_compiling():
            # (dynamo cannot trace the cache's identity and version checks, and would break the graph
            # in every layer; a compiled graph rebuilds the small mask per layer instead)
            return extend_attention_mask(real(), _prefix_columns(self, batch, device), query_len, key_len, causal,
                                         dtype, additive)
        p = next(iter(self.keys.values())).shape[-2]
        key = (attention_mask, _version(attention_mask), self.mask, _version(self.mask), p, batch, query_len,
               key_len, causal, dtype, additive, str(device), as_bool)
        for entry, extended in self._masks:
            if all(a is b if isinstance(a, torch.Tensor) or a is None else a == b for a, b in zip(entry, key)):
                return extended
        extended = extend_attention_mask(real(), _prefix_columns(self, batch, device), query_len, key_len, causal,
                                         dtype, additive)
        # a state reused across forwards (generate's steps) sees a new mask each step: keep a few
        del self._masks[:-(_MASKS_KEPT - 1)]
        self._masks.append((key, extended))  # (holding the real mask keeps its id from being reused)
        return extended


_MASKS_KEPT = 8


def _version(t: torch.Tensor | None) -> int | None:
    # (inference tensors, made under inference_mode as in Lightning's evaluation, have no version
    # counter; they cannot be changed in place outside inference mode)
    return None if t is None or t.is_inference() else t._version


def install_prefix_attention(model: PreTrainedModel) -> list[AttentionSlot]:
    """Route `model`'s attention through the prefix-aware kernel; returns its slots, slot i being
    the i-th attention module (self- and cross-attention) in module order.

    Without a `peft_prefix` keyword at forward time the model computes exactly what it did before.
    """
    slots = attention_slots(model)
    if getattr(model, "_peft_prefix_installed", False):
        return [s for s, _ in slots]
    if model.config.model_type in PATCHED_FORWARDS:
        _install_patched(model, slots)
    else:
        base = model.config._attn_implementation
        if base not in IMPLEMENTATIONS:
            raise ValueError(
                f"Prefix injection supports attn_implementation 'sdpa' or 'eager', got '{base}'. "
                "Set model.attn_implementation in the config."
            )
        model.set_attn_implementation(IMPLEMENTATIONS[base])
    for i, (_, module) in enumerate(slots):
        setattr(module, SLOT_ATTR, i)
    model._peft_prefix_installed = True
    compat.check_installed(model, [m for _, m in slots])  # loud, not "no prefix applied", if internals changed
    compat.check_causal_flags([(s.role, m) for s, m in slots])
    return [s for s, _ in slots]


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
        attention_mask = state.extended_mask(attention_mask, batch, query.shape[-2], key_len, causal, query.dtype,
                                             additive, query.device)
    bias = kwargs.get("position_bias")
    if bias is not None:  # T5's relative position bias: the prefix has no position, so no bias
        kwargs["position_bias"] = nn.functional.pad(bias, (pk.shape[-2], 0))
    kwargs["is_causal"] = False  # the mask (or its absence, for encoders) now says everything
    return key, value, attention_mask


def prefix_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    key, value, attention_mask = _with_prefix(module, query, key, value, attention_mask, kwargs, additive=False)
    return _kernel(sdpa_attention_forward, module, query, key, value, attention_mask, kwargs)


def prefix_eager_attention(module, query, key, value, attention_mask, **kwargs):
    key, value, attention_mask = _with_prefix(module, query, key, value, attention_mask, kwargs, additive=True)
    kwargs.pop("is_causal", None)
    # The model's own eager kernel (every transformers 5 modeling file defines one), so details
    # such as GQA head repetition or softcapping stay the model's.
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return _kernel(eager, module, query, key, value, attention_mask, kwargs)


def _kernel(kernel, module, query, key, value, attention_mask, kwargs):
    if getattr(module, RECOMPUTE_ATTR, False) and torch.is_grad_enabled():
        # only the attention core is recomputed in backward: its input (query, key and value)
        # is kept, its internals (scores, probabilities, dropout mask: batch x heads x L x (P+L)
        # each on the math and eager kernels) are not; the dropout mask is redrawn identically
        return torch.utils.checkpoint.checkpoint(
            lambda q, k, v: kernel(module, q, k, v, attention_mask, **kwargs), query, key, value,
            use_reentrant=False)
    return kernel(module, query, key, value, attention_mask, **kwargs)


def recompute_attention(model: PreTrainedModel, on: bool = True) -> None:
    """Selective activation recomputation (Korthikanti et al., 2022) in `model`'s prefix-aware
    attention: keep each attention module's query, key and value for backward and recompute the
    rest of the attention from them, instead of storing its L x (P+L) internals. The other
    sublayers keep their activations (cheap to store, costly to recompute), unlike transformers'
    activation checkpointing, which recomputes whole layers. Not for DeBERTa (own attention code)."""
    if model.config.model_type in PATCHED_FORWARDS:
        raise ValueError(f"recomputing only the attention is not supported for {model.config.model_type}: "
                         "its attention is not computed by the shared kernel")
    for _, module in attention_slots(model):
        setattr(module, RECOMPUTE_ATTR, on)


AttentionInterface.register(IMPLEMENTATIONS["sdpa"], prefix_sdpa_attention)
AttentionInterface.register(IMPLEMENTATIONS["eager"], prefix_eager_attention)
# Masks are built exactly as for the underlying kernel.
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATIONS["sdpa"], sdpa_mask)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATIONS["eager"], eager_mask)


# --- architectures whose attention does not go through AttentionInterface ------------------------
# DeBERTa-v2's disentangled attention computes its scores itself and its model drops extra forward
# keywords. There the prefix travels on the attention modules (set by a pre-hook on the model from
# the same `peft_prefix` keyword) and a replacement forward joins it exactly as the kernel above
# does. The prefix has no position, so its columns get no relative-position (c2p/p2c) term, as in
# the official P-Tuning v2 DeBERTa code.


def _deberta_v2_forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                        relative_pos=None, rel_embeddings=None):
    state: PrefixState | None = getattr(self, STATE_ATTR, None)
    slot = getattr(self, SLOT_ATTR, None)
    if state is None or slot not in state.keys:
        return type(self).forward(self, hidden_states, attention_mask, output_attentions, query_states,
                                  relative_pos, rel_embeddings)
    scaled_size_sqrt = sys.modules[type(self).__module__].scaled_size_sqrt
    if query_states is None:
        query_states = hidden_states
    heads = self.num_attention_heads
    q = self.transpose_for_scores(self.query_proj(query_states), heads)  # (B*H, L, D)
    k = self.transpose_for_scores(self.key_proj(hidden_states), heads)
    v = self.transpose_for_scores(self.value_proj(hidden_states), heads)
    batch = hidden_states.shape[0]
    pk = state.keys[slot].to(k.dtype).expand(batch, -1, -1, -1).reshape(batch * heads, -1, k.shape[-1])
    pv = state.values[slot].to(v.dtype).expand(batch, -1, -1, -1).reshape(batch * heads, -1, v.shape[-1])
    scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
    scale = scaled_size_sqrt(q, scale_factor).to(q.dtype)
    scores = torch.bmm(q, k.transpose(-1, -2) / scale)
    if self.relative_attention:
        scores = scores + self.disentangled_attention_bias(
            q, k, relative_pos, self.pos_dropout(rel_embeddings), scale_factor
        )
    scores = torch.cat([torch.bmm(q, pk.transpose(-1, -2) / scale), scores], dim=-1)
    scores = scores.view(batch, heads, scores.shape[-2], scores.shape[-1])
    mask = state.extended_mask(attention_mask, batch, q.shape[-2], k.shape[-2], causal=False, dtype=q.dtype,
                               additive=False, device=q.device, as_bool=True)
    scores = scores.masked_fill(~mask, torch.finfo(q.dtype).min)
    probs = self.dropout(nn.functional.softmax(scores, dim=-1))
    context = torch.bmm(probs.view(batch * heads, probs.shape[-2], -1), torch.cat([pv, v], dim=-2))
    context = context.view(batch, heads, context.shape[-2], -1).permute(0, 2, 1, 3).reshape(batch, -1, heads * v.shape[-1])
    return (context, probs if output_attentions else None)


PATCHED_FORWARDS = {"deberta-v2": _deberta_v2_forward}


def _install_patched(model: PreTrainedModel, slots) -> None:
    import types

    forward = PATCHED_FORWARDS[model.config.model_type]
    modules = [m for _, m in slots]
    for module in modules:
        module.forward = types.MethodType(forward, module)

    def take_prefix(_model, args, kwargs):
        state = kwargs.pop(PREFIX_KWARG, None)
        for module in modules:
            setattr(module, STATE_ATTR, state)
        return args, kwargs

    def drop_prefix(_model, _args, _kwargs, output):
        # Activation checkpointing recomputes the layers during backward, after this hook: keep the
        # state for it then (the next forward replaces it).
        if not (checkpointing(model) and torch.is_grad_enabled()):
            for module in modules:
                setattr(module, STATE_ATTR, None)
        return output

    model.register_forward_pre_hook(take_prefix, with_kwargs=True)
    model.register_forward_hook(drop_prefix, with_kwargs=True)
