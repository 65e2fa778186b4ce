"""UniPELT (Mao et al., 2022): prefix-tuning, adapters and LoRA together, each behind a gate that
learns how much of it to use.

  prefix  deep prefixes (the prompt knobs of prompting.py: prefix_length, reparameterization,
          reparam_hidden); gate: one learned scalar sigmoid(g_s) per attention slot scaling the
          prefix values. (The paper computes this gate from the layer input; the prefix here is
          built before the layers run, so its gate is input-independent.)
  adapter after the feed-forward output (bottleneck b); gate sigmoid(w.x + b) from its input
  lora    on the query and value projections (r, alpha); gate sigmoid(w.x + b) from its input

Trainable parameters: the prefix as prompting.py + S gates, + per adapter 2 d b + b + d + (d + 1),
+ per LoRA target r (in + out) + (in + 1), + the head.
"""
import torch
from torch import nn

from peft_lightning.injection.modules import attach_adapters, attach_lora
from peft_lightning.injection.prefix import PrefixState
from peft_lightning.methods.adapter import adapter_patterns
from peft_lightning.methods.lora import lora_patterns
from peft_lightning.methods.prompting import PromptMethod


class UniPELT(PromptMethod):
    def build(self) -> None:
        cfg = self.method_cfg
        if cfg.get("depth", "deep") == "embedding":
            raise ValueError("method=unipelt gates deep prefixes: method.depth must be 'deep' or a layer list")
        super().build()
        model_type = self.backbone.config.model_type
        self.prefix_gate = nn.Parameter(torch.zeros(len(self.prefix.slots)))
        self.adapters = attach_adapters(self.backbone, adapter_patterns(model_type, "pfeiffer"),
                                        int(cfg.get("bottleneck", 64)), cfg.get("activation", "gelu"), gated=True)
        self.lora = attach_lora(self.backbone, lora_patterns(model_type, cfg.get("target_modules")),
                                int(cfg.get("r", 8)), float(cfg.get("alpha", 16)), float(cfg.get("dropout", 0.0)),
                                gated=True)

    def encode(self, batch):
        state = self.prefix(batch["input_ids"].shape[0])
        gates = torch.sigmoid(self.prefix_gate)
        values = {slot: v * gates[i] for i, (slot, v) in enumerate(state.values.items())}
        return self.run_backbone(batch, prefix=PrefixState(state.keys, values, state.mask))
