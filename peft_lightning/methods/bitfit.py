"""BitFit (Ben Zaken et al., 2022): train only the backbone's bias terms (+ the head).

Trainable parameters: the sum of the sizes of every `*.bias` tensor of the backbone (attention
query/key/value/output, feed-forward and LayerNorm biases; not the unused pooler's) + hidden x C + C
for the head.
"""
from peft_lightning.methods.base import PeftClassifier


class BitFit(PeftClassifier):
    def build(self) -> None:
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name.endswith(".bias"))
