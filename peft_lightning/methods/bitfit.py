"""BitFit (Ben Zaken et al., 2022): train only the backbone's bias terms (+ the head).

Trainable parameters: the sum of the sizes of every `*.bias` tensor of the backbone (attention
query/key/value/output, feed-forward and LayerNorm biases; not the unused pooler's) + hidden x C + C
for the head.
"""
from peft_lightning.methods.base import PeftClassifier


class BitFit(PeftClassifier):
    def build(self) -> None:
        biases = 0
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name.endswith(".bias"))
            biases += name.endswith(".bias")
        if not biases:
            raise ValueError(
                f"method=bitfit trains bias terms, and architecture '{self.backbone.config.model_type}' has none "
                "(T5 and Llama use no biases); pick another method, e.g. lora or adapter"
            )
