"""LoRA (Hu et al., 2022): a trainable low-rank update B A (scaled by alpha / r) added to chosen
frozen projections; B starts at zero, so training starts from the backbone exactly.
DoRA (Liu et al., 2024; `method=dora`): the same update, with the updated weight's rows
normalised and rescaled by a learned magnitude per output feature (weight decomposition, as
peft's `use_dora`); the magnitude starts at the frozen weight's row norms, so DoRA also starts
from the backbone exactly.

  r, alpha, dropout   rank, scale numerator, dropout on the LoRA input
  target_modules      regexes of module names; default: the architecture's query and value
                      projections (GPT-2: the fused q/k/v projection c_attn, as HF peft)
  optim.lr_ratio      LoRA+ (Hayou et al., 2024): the B matrices learn at lr x lr_ratio, the rest
                      at lr (1: plain LoRA; the paper suggests 2^4 = 16). Also for unipelt.

Trainable parameters: per target with weight out x in, r x (in + out) (DoRA: + out); plus the head.
"""
from peft_lightning.injection.architectures import architecture
from peft_lightning.injection.modules import attach_lora
from peft_lightning.methods.base import PeftClassifier


def lora_patterns(model_type: str, targets) -> list[str]:
    return list(targets) if targets else list(architecture(model_type, "LoRA").lora_targets)


class LoRATuning(PeftClassifier):
    dora = False

    def build(self) -> None:
        cfg = self.method_cfg
        patterns = lora_patterns(self.backbone.config.model_type, cfg.get("target_modules"))
        self.lora = attach_lora(self.backbone, patterns, int(cfg.get("r", 8)), float(cfg.get("alpha", 16)),
                                float(cfg.get("dropout", 0.0)), dora=self.dora)


class DoRATuning(LoRATuning):
    dora = True
