"""P-Tuning v2 (Liu et al., 2022): deep prompts at every layer + a linear classification head.

Knobs (method config):
  prefix_length       P, the number of virtual tokens
  reparameterization  none | mlp | lstm  (P-Tuning v2 uses none; `reparam_hidden` sizes the net)
  depth               deep (every layer) | embedding (input-level prompt only) | [layer, ...]
  prefix_dropout      dropout on each example's copy of the prefix (0.1 in P-Tuning v2)

Trainable parameters, deep or a layer list of S layers, no reparameterization:
  P x 2 x S x hidden  +  hidden x C + C (head)
With reparameterization=mlp (hidden size h, embedding width E = hidden):
  P x E + (E x h + h) + (h x 2 x S x hidden + 2 x S x hidden)  +  head
Embedding-only (depth=embedding): P x hidden (+ the same MLP with output width hidden) + head.
"""
from __future__ import annotations

from omegaconf import ListConfig

from peft_lightning.backbone import attention_geometry
from peft_lightning.injection import InputPrompt, PrefixEncoder, PromptEncoder, install_prefix_attention
from peft_lightning.injection.prefix import PREFIX_KWARG
from peft_lightning.methods.base import PeftClassifier


def parse_depth(depth, num_layers: int) -> str | list[int]:
    """'deep' | 'embedding' | list of layer indices, validated against the backbone."""
    if isinstance(depth, str) and depth in ("deep", "embedding"):
        return depth
    if isinstance(depth, (list, tuple, ListConfig)) and depth:
        layers = [int(i) for i in depth]
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"method.depth has layer index {bad} out of range: this backbone has layers 0..{num_layers - 1}."
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"method.depth lists a layer twice: {layers}")
        return sorted(layers)
    raise ValueError(f"method.depth must be 'deep', 'embedding' or a non-empty list of layer indices, got {depth!r}")


class PTuningV2(PeftClassifier):
    def build(self) -> None:
        cfg = self.method_cfg
        P = int(cfg["prefix_length"])
        config = self.backbone.config
        num_layers, kv_heads, head_dim = attention_geometry(config)
        self.depth = parse_depth(cfg.get("depth", "deep"), num_layers)
        self.prefix_length = P
        reparam = cfg.get("reparameterization", "none")
        hidden = int(cfg.get("reparam_hidden", 512))
        if self.depth == "embedding":
            self.prompt = PromptEncoder(P, config.hidden_size, reparam, hidden, config.hidden_size, init_std=0.02)
            self.input_prompt = InputPrompt(self.backbone, config.model_type)
        else:
            num_slots = install_prefix_attention(self.backbone)
            slots = list(range(num_slots)) if self.depth == "deep" else self.depth
            self.prefix = PrefixEncoder(
                P, slots, kv_heads, head_dim, reparam, hidden,
                embed_dim=config.hidden_size, dropout=float(cfg.get("prefix_dropout", 0.0)),
            )

    def encode(self, batch):
        inputs = self.backbone_inputs(batch)
        if self.depth == "embedding":
            inputs["attention_mask"] = InputPrompt.extend_mask(inputs["attention_mask"], self.prefix_length)
            with self.input_prompt.prepended(self.prompt()):
                hidden = self.backbone(**inputs).last_hidden_state
            return InputPrompt.strip(hidden, self.prefix_length)
        state = self.prefix(batch["input_ids"].shape[0])
        return self.backbone(**inputs, **{PREFIX_KWARG: state}).last_hidden_state
