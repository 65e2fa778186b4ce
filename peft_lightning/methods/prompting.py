"""The shared base of every prompt method: virtual tokens as deep prefixes or an input prompt.

Prefix-Tuning, Prompt Tuning, P-Tuning and P-Tuning v2 differ in where their virtual tokens go
and how they are produced, which here are knobs with one meaning across all four (so one sweep
can vary them across methods); each method only sets its own defaults (conf/method/*.yaml):

  prefix_length       P, the number of virtual tokens
  depth               deep: a key/value prefix in every attention module (encoder self-, decoder
                      self- and cross-attention for encoder-decoders, as Li & Liang);
                      [i, ...]: only in the attention modules of those layers;
                      embedding: an input-level prompt in front of the token embeddings
  reparameterization  none (a free table) | mlp (Li & Liang) | lstm (P-Tuning), `reparam_hidden` wide
  init                random | uniform ([-0.5, 0.5], Lester et al.) | vocab (embeddings of sampled
                      vocabulary tokens) | labels (the class-label words' embeddings, then sampled
                      tokens) | text (the embeddings of `init_text`'s tokens, repeated to P) |
                      adapter (another run's prompt, `init_from`: prompt_transfer.py, SPoT)
  prefix_dropout      dropout on each example's copy of a deep prefix
  eject_on_export     save the adapter as the flat prompt the reparameterization produces
  recompute_attention keep only each attention's query/key/value for backward and recompute the
                      attention from them (not with activation_checkpointing, which recomputes
                      whole layers; deep prefixes only; not DeBERTa)
  cache_frozen_layers auto | true | false: with prompts from layer k > 0 only, keep each example's
                      layer-k input after it is first seen and run only layers k.. later
                      (peft_lightning/frozen_cache.py says where it is valid)
Token-level outputs are always aligned with the input tokens (prompt positions are stripped).

Trainable parameters (S attention slots; per slot kv_heads x head_dim = d, usually `hidden`):
  depth deep/[layers], reparameterization none:  P x S x 2 x d
  depth embedding, none:                         P x hidden
  mlp (output width W = S x 2 x d, or hidden):   P x hidden + (hidden x h + h) + (h x W + W)
  lstm: P x hidden + biLSTM(hidden -> h/2 per direction, 2 layers) + (h x h + h) + (h x W + W)
plus the head: hidden x C + C.
"""
from __future__ import annotations

import logging

import torch
from omegaconf import ListConfig
from torch import nn

from peft_lightning import frozen_cache
from peft_lightning.backbone import BackboneSpec, attention_geometry, load_tokenizer
from peft_lightning.errors import ConfigError
from peft_lightning.injection import InputPrompt, PrefixEncoder, PromptEncoder, install_prefix_attention
from peft_lightning.injection.architectures import num_layers
from peft_lightning.injection.prefix import PREFIX_KWARG, PrefixState, recompute_attention
from peft_lightning.injection.prefix_encoder import KVPrompt, kv_optimizer_state
from peft_lightning.methods.base import PeftClassifier
from peft_lightning.methods.prompt_transfer import init_from_adapter

INITS = ("random", "uniform", "vocab", "labels", "text", "adapter")
log = logging.getLogger(__name__)


def parse_depth(depth, layers: int) -> str | list[int]:
    """'deep' | 'embedding' | list of layer indices, validated against the backbone."""
    if isinstance(depth, str) and depth in ("deep", "embedding"):
        return depth
    if isinstance(depth, (list, tuple, ListConfig)) and depth:
        chosen = [int(i) for i in depth]
        bad = [i for i in chosen if not 0 <= i < layers]
        if bad:
            raise ValueError(
                f"method.depth has layer index {bad} out of range: this backbone has layers 0..{layers - 1}."
            )
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"method.depth lists a layer twice: {chosen}")
        return sorted(chosen)
    raise ValueError(f"method.depth must be 'deep', 'embedding' or a non-empty list of layer indices, got {depth!r}")


class PromptMethod(PeftClassifier):
    def build(self) -> None:
        cfg = self.method_cfg
        config = self.backbone.config
        self.prefix_length = P = int(cfg["prefix_length"])
        self.depth = parse_depth(cfg.get("depth", "deep"), num_layers(config))
        reparam = cfg.get("reparameterization", "none")
        hidden = int(cfg.get("reparam_hidden", 512))
        width = config.hidden_size
        self.prompt: PromptEncoder | None = None
        self.prefix: PrefixEncoder | None = None
        if self.depth == "embedding":
            self.input_prompt = InputPrompt(self.backbone)
            # vectors in embedding space start at the scale of real embeddings
            self.prompt = PromptEncoder(P, width, reparam, hidden, width, init_std=0.02)
        else:
            slots = install_prefix_attention(self.backbone)
            chosen = [i for i, s in enumerate(slots) if self.depth == "deep" or s.layer in self.depth]
            _, kv_heads, head_dim = attention_geometry(config)
            # no reparameterization: N(0, 1), as P-Tuning v2's nn.Embedding prefix
            self.prefix = PrefixEncoder(P, chosen, kv_heads, head_dim, reparam, hidden, embed_dim=width,
                                        dropout=float(cfg.get("prefix_dropout", 0.0)))
        self._initialize(cfg.get("init", "random"))
        if cfg.get("recompute_attention", False):
            if self.prefix is None:
                raise ConfigError("method.recompute_attention needs deep prefixes (method.depth deep or a layer list): "
                                  "the input-level prompt's attention is not prefix-aware")
            if cfg.get("activation_checkpointing", False):
                raise ConfigError("method.recompute_attention and method.activation_checkpointing: pick one "
                                  "(activation checkpointing already recomputes whole layers, attention included)")
            try:
                recompute_attention(self.backbone)
            except ValueError as err:
                raise ConfigError(f"method.recompute_attention: {err}") from None
        self.frozen_cache: frozen_cache.FrozenLayerCache | None = None
        self._cache_setting = frozen_cache.setting(cfg.get("cache_frozen_layers", False))
        if self._cache_setting is not False:
            reason = frozen_cache.static_reason(self.backbone, self.depth, cfg, self.task.needs_lm)
            if reason is None and type(self).encode is not PromptMethod.encode:
                reason = f"method={cfg['name']} runs the backbone its own way (not through the cache)"
            if reason is None:
                self.frozen_cache = frozen_cache.FrozenLayerCache(self.backbone, min(self.depth))
            else:
                self._cache_off(reason)

    def _cache_off(self, reason: str) -> None:
        if self._cache_setting is True:
            raise ConfigError(f"method.cache_frozen_layers=true cannot be used here: {reason}")
        log.info("frozen-layer cache off (method.cache_frozen_layers=auto): %s", reason)
        self.frozen_cache = None

    @property
    def prompt_encoder(self) -> PromptEncoder:
        return self.prompt if self.prompt is not None else self.prefix.encoder

    @torch.no_grad()
    def _initialize(self, init: str) -> None:
        if init not in INITS:
            raise ValueError(f"method.init must be one of {INITS}, got {init!r}")
        encoder = self.prompt_encoder
        kv = isinstance(encoder, KVPrompt)  # a free deep prefix, stored in key/value layout
        table = encoder() if kv else encoder.embedding.weight  # (P, width): drawn and filled flat
        write = encoder.set_flat if kv else table.copy_
        if init == "random":
            return
        if init == "adapter":
            return init_from_adapter(self, self.method_cfg.get("init_from"))
        if init == "uniform":
            write(nn.init.uniform_(torch.empty_like(table), -0.5, 0.5))
            return
        embed = self.backbone.get_input_embeddings()
        if table.shape[1] != embed.weight.shape[1]:
            raise ValueError(
                f"method.init={init} puts token embeddings in the prompt table, which needs the table in "
                "embedding space: use depth=embedding or reparameterization=mlp|lstm (or init=random|uniform)."
            )
        P, vocab = table.shape[0], embed.weight.shape[0]
        sampled = torch.randint(0, vocab, (P,))
        if init == "vocab":
            ids = sampled
        else:
            tokenizer = load_tokenizer(BackboneSpec(**self.hparams.model))
            if init == "labels":
                words = [str(w) for w in (self.hparams.labels or [])]
                if not words:
                    raise ValueError("method.init=labels needs the data config's label names")
                ids = [i for w in words for i in tokenizer(w, add_special_tokens=False)["input_ids"]]
                ids = torch.cat([torch.tensor(ids[:P], dtype=torch.long), sampled[len(ids):]])
            else:
                text = self.method_cfg.get("init_text")
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
                if not ids:
                    raise ValueError("method.init=text needs method.init_text, a non-empty string")
                ids = torch.tensor(ids, dtype=torch.long).repeat(P // len(ids) + 1)[:P]
        if int(ids.max()) >= vocab:
            raise ValueError(f"method.init={init}: the tokenizer gives ids beyond this backbone's vocabulary ({vocab})")
        write(embed(ids.to(table.device)).to(table.dtype))

    def encode(self, batch):
        if self.prompt is not None:
            return self.run_backbone(batch, prompt=self.prompt())
        prefix = self.prefix(batch["input_ids"].shape[0])
        if self.frozen_cache is not None:
            # checked on use, after a subclass's build (UniPELT's adapters and LoRA sit below k)
            reason = self.frozen_cache.structural_reason()
            if reason is None:
                # store what repeats: training examples, and the validation set (run every epoch)
                stage = self._trainer.state.stage if self._trainer is not None else None
                store = self.training or (stage is not None and stage.value in ("validate", "sanity_check"))
                return self.frozen_cache(self.backbone_inputs(batch), store=store, **{PREFIX_KWARG: prefix})
            self._cache_off(reason)
        return self.run_backbone(batch, prefix=prefix)

    def generation_inputs(self, input_ids, attention_mask) -> dict:
        """The prefix (one copy: beams and rows broadcast), or the prompt: for an encoder-decoder
        the prompted encoder output; for a decoder the keys/values the prompt leaves in every
        layer, which are exactly what the text after it attends to (causal attention: the prompt
        never sees that text), so `generate` keeps its KV cache and the real tokens their positions."""
        if self.prefix is not None:
            return {PREFIX_KWARG: self.prefix(1)}
        prompt = self.prompt()
        if self.kind == "encoder-decoder":
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            with self.input_prompt.prepended(inputs, prompt) as joined:
                encoded = self.backbone.get_encoder()(**joined)
            return {"encoder_outputs": encoded, "attention_mask": joined["attention_mask"]}
        install_prefix_attention(self.backbone)  # (idempotent; without a prefix nothing changes)
        length = prompt.shape[0]
        embeds = prompt[None].to(self.backbone.get_input_embeddings().weight.dtype)
        positions = torch.zeros(1, length, dtype=torch.long, device=prompt.device)  # as in training
        cache = self.backbone(inputs_embeds=embeds, position_ids=positions, use_cache=True).past_key_values
        layers = cache.layers
        return {PREFIX_KWARG: PrefixState({i: layer.keys for i, layer in enumerate(layers)},
                                          {i: layer.values for i, layer in enumerate(layers)})}

    def configure_optimizers(self):
        config = super().configure_optimizers()
        if self.prefix is not None and isinstance(self.prefix.encoder, KVPrompt):
            # checkpoints keep the moments of the key/value-layout table flat, like the table itself
            kv_optimizer_state(config["optimizer"], self.prefix.encoder.embedding)
        return config

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The adapter to save. With `eject_on_export` (prefix_tuning's default) the
        reparameterization network is ejected into the flat table it produces: identical outputs,
        far fewer numbers, no network to rebuild. Training checkpoints always keep the network."""
        tensors, method = super().export_state()
        if method.get("init") == "adapter":  # the saved tensors are the prompt: loading never reads the source again
            method = {**{k: v for k, v in method.items() if k != "init_from"}, "init": "random"}
        encoder = self.prompt_encoder
        if encoder.net is None or not method.get("eject_on_export", False):
            return tensors, method
        name = "prompt" if self.prompt is not None else "prefix.encoder"
        tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}.")}
        tensors[f"{name}.embedding.weight"] = encoder().detach().contiguous().cpu()
        return tensors, {**method, "reparameterization": "none", "init": "random"}
