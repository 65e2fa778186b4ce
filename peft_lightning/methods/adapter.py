"""Adapter tuning: bottleneck adapters after the sublayers of every layer of the frozen backbone.

  style houlsby  (Houlsby et al., 2019): after the attention output projection(s) and after the
                 feed-forward output projection, before each residual connection
  style pfeiffer (Pfeiffer et al., 2021): after the feed-forward output projection only
  bottleneck     the adapter's inner width b;  activation gelu | relu | tanh

Trainable parameters: per adapted sublayer output of width d, 2 x d x b + b + d; plus the head
hidden x C + C. (Encoder-decoders: houlsby adapts self- and cross-attention outputs.)
"""
from peft_lightning.injection.architectures import architecture
from peft_lightning.injection.modules import attach_adapters
from peft_lightning.methods.base import PeftClassifier

STYLES = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}


def adapter_patterns(model_type: str, style: str) -> list[str]:
    if style not in STYLES:
        raise ValueError(f"method.style must be one of {sorted(STYLES)}, got {style!r}")
    targets = architecture(model_type, "Adapters").adapter_targets
    return [targets[sublayer] for sublayer in STYLES[style]]


class AdapterTuning(PeftClassifier):
    def build(self) -> None:
        cfg = self.method_cfg
        patterns = adapter_patterns(self.backbone.config.model_type, cfg.get("style", "houlsby"))
        self.adapters = attach_adapters(self.backbone, patterns, int(cfg.get("bottleneck", 64)),
                                        cfg.get("activation", "gelu"))
