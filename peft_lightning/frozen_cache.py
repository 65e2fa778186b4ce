"""Skip frozen work that repeats: the layers below the first prompted layer, cached per example.

With prompts only in layers k, k+1, ... (`method.depth` a layer list whose smallest layer is k > 0,
as in late prompt tuning) the embeddings and layers 0..k-1 are a frozen function of the input
tokens: nothing trains there and no prefix reaches them. Their output for an example is the same
in every epoch, so it is computed once (the first time the example is seen, by the ordinary
forward pass) and kept in memory; once every row of a batch is cached, the batch runs only layers
k.. on the stored hidden states. Metrics and gradients are those of the uncached run (real tokens
only: padding positions are filled with zeros, and no real token attends to them).

    method.cache_frozen_layers: auto | true | false     (auto: on wherever it is valid)

Valid only where the stored states are provably what the layers would compute again:
  - BERT and RoBERTa encoders (we run their layers k.. ourselves, exactly as their encoder does;
    tests/test_frozen_cache.py checks it against the model's own forward);
  - the backbone below k in eval mode (no dropout: `backbone_dropout: false`), no activation
    checkpointing, and nothing trainable or hooked below k (adapters, LoRA: UniPELT);
  - not for generation (LM outputs).
`true` where it is not valid is a config error; `auto` logs why it stays off.

Key: a hash of each row's tokens, attention mask and token types up to its last real token (the
same example padded to another length hits the same entry; positions count from the left, so a
left-padded row is another entry). The cache belongs to one module and is cleared when anything
it depends on changes: a weight, buffer, dtype or device below k, a module's mode, autocast.
It stops growing at `MAX_BYTES` (the rest of the examples then run uncached).
"""
from __future__ import annotations

import inspect

import hashlib
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

SUPPORTED = ("bert", "roberta")
MAX_BYTES = 2 << 30
SETTINGS = ("auto", True, False)


def setting(value) -> str | bool:
    """The knob's value: auto, True or False (also from the strings 'true' / 'false')."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value not in SETTINGS or isinstance(value, int) and not isinstance(value, bool):
        from peft_lightning.errors import ConfigError

        raise ConfigError(f"method.cache_frozen_layers must be auto, true or false, got {value!r}")
    return value


def static_reason(backbone: nn.Module, depth, method: dict, needs_lm: bool) -> str | None:
    """Why the cache cannot be used for this configuration, or None (checked at build)."""
    config = backbone.config
    if not isinstance(depth, list) or min(depth) == 0:
        return "prompts start at layer 0 (method.depth is not a layer list above 0): nothing below them to cache"
    if config.model_type not in SUPPORTED or getattr(config, "is_decoder", False):
        return f"model type {config.model_type!r} is not a supported encoder ({', '.join(SUPPORTED)})"
    if needs_lm:
        return "generation tasks are not supported"
    if method.get("backbone_dropout", False):
        return "backbone_dropout is on: the frozen layers are not a fixed function of the input in training"
    if method.get("activation_checkpointing", False):
        return "activation checkpointing is on"
    if not hasattr(backbone, "_create_attention_masks") or not hasattr(backbone, "encoder"):
        return f"{type(backbone).__name__} lacks the encoder structure this transformers version was checked with"
    # private internals, called positionally below: their leading parameters must still mean what they did
    # (the cache argument's name changed in 5.24, past_key_values -> cache; the positions did not)
    for fn, lead in ((type(backbone)._create_attention_masks, MASK_PARAMS),
                     (type(backbone.encoder.layer[0]).forward, LAYER_PARAMS)):
        names = tuple(inspect.signature(fn).parameters)[: len(lead) + 1]
        if names[:-1] != lead or names[-1] not in ("cache", "past_key_values"):
            return f"{fn.__qualname__}{names} is not the signature this transformers version was checked with"
    return None


MASK_PARAMS = ("self", "attention_mask", "encoder_attention_mask", "embedding_output", "encoder_hidden_states")
LAYER_PARAMS = ("self", "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask")


class FrozenLayerCache:
    def __init__(self, backbone: nn.Module, start: int, max_bytes: int = MAX_BYTES):
        self.backbone, self.start, self.max_bytes = backbone, start, max_bytes
        self.layers = backbone.encoder.layer
        self.lower = nn.ModuleList([backbone.embeddings, *self.layers[:start]])
        self.entries: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.stored = 0  # rows served from / added to the cache
        self._fingerprint = None
        self._full_logged = False

    # --- validity ----------------------------------------------------------------------------
    def structural_reason(self) -> str | None:
        """Why the layers below `start` are not a fixed frozen function right now, or None."""
        for name, module in self.lower.named_modules():
            if module._forward_hooks or module._forward_pre_hooks:
                return f"a module below layer {self.start} is hooked ({name or 'embeddings'}: adapters, LoRA?)"
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                return f"a module below layer {self.start} trains ({name or 'embeddings'})"
        return None

    def active_dropout(self) -> bool:
        """Dropout below `start` is on (attention dropout too: BERT reads its module's p)."""
        return any(m.training and m.p > 0 for m in self.lower.modules() if isinstance(m, nn.Dropout))

    def fingerprint(self, device_type: str) -> tuple:
        tensors = [*self.lower.parameters(), *self.lower.buffers()]
        autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        return (autocast, tuple(m.training for m in self.lower.modules()),
                tuple((t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device, t.shape)
                      for t in tensors))

    # --- the forward pass ----------------------------------------------------------------------
    @staticmethod
    def row_keys(inputs: dict[str, torch.Tensor]) -> tuple[list[bytes], list[int]]:
        """Per row: a hash of its tokens, mask and token types up to its last real token; that length."""
        mask = inputs["attention_mask"]
        parts = [inputs["input_ids"].to(torch.int64), mask.to(torch.int8)]
        if "token_type_ids" in inputs:
            parts.append(inputs["token_type_ids"].to(torch.int64))
        parts = [p.cpu().numpy() for p in parts]
        positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
        lengths = ((mask != 0) * positions).amax(1).clamp(min=1).tolist()  # last real token + 1
        keys = []
        for row, n in enumerate(lengths):
            h = hashlib.blake2b(digest_size=16)
            for p in parts:
                h.update(p[row, :n].tobytes())
            keys.append(h.digest())
        return keys, lengths

    def __call__(self, inputs: dict[str, torch.Tensor], store: bool = True, **kwargs) -> torch.Tensor:
        """The backbone's last hidden states for `inputs` (input_ids, attention_mask[,
        token_type_ids]); `kwargs` go to the layers (the prefix)."""
        if self.active_dropout():  # (a backbone put in training mode by hand): not a fixed function
            return self.backbone(**inputs, **kwargs).last_hidden_state
        ids = inputs["input_ids"]
        fingerprint = self.fingerprint(ids.device.type)
        if fingerprint != self._fingerprint:  # the frozen function changed: nothing stored holds
            self.clear()
            self._fingerprint = fingerprint
        keys, lengths = self.row_keys(inputs)
        found = [self.entries.get(k) for k in keys]
        if all(f is not None for f in found):
            self.hits += len(found)
            return self._top(found, inputs["attention_mask"], **kwargs)
        return self._full(inputs, keys, lengths, found, store, **kwargs)

    def _full(self, inputs, keys, lengths, found, store, **kwargs) -> torch.Tensor:
        """The ordinary forward pass, reading the input of layer `start` on the way."""
        captured = []
        handle = self.layers[self.start].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            hidden = self.backbone(**inputs, **kwargs).last_hidden_state
        finally:
            handle.remove()
        if store:
            with torch.inference_mode(False):  # (a tensor made in inference mode could not be used in training)
                for row, (key, n) in enumerate(zip(keys, lengths)):
                    if found[row] is not None or key in self.entries:
                        continue
                    size = n * captured[0].shape[-1] * captured[0].element_size()
                    if self.bytes + size > self.max_bytes:
                        if not self._full_logged:
                            log.warning("frozen-layer cache full (%d examples, %.0f MiB): further examples run "
                                        "uncached", len(self.entries), self.bytes / 2**20)
                            self._full_logged = True
                        break
                    # a copy of the row: a slice would keep the whole batch's tensor alive
                    self.entries[key] = captured[0][row, :n].detach().clone()
                    self.bytes += size
                    self.stored += 1
        return hidden

    def _top(self, rows: list[torch.Tensor], attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """Layers `start`.. on the stored states, called as BertModel/RobertaModel.forward and
        their encoder call them (transformers 5: the layer's positional hidden states, mask and
        encoder states, then keywords)."""
        hidden = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        hidden = nn.functional.pad(hidden, (0, 0, 0, attention_mask.shape[1] - hidden.shape[1]))
        # positional: (attention_mask, encoder_attention_mask, embedding_output, encoder_hidden_states, cache),
        # checked in static_reason; the cache's keyword is past_key_values before transformers 5.24
        mask, _ = self.backbone._create_attention_masks(attention_mask, None, hidden, None, None)
        for layer in self.layers[self.start:]:
            hidden = layer(hidden, mask, None, None, None, position_ids=None, **kwargs)
        return hidden

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
        self._full_logged = False
