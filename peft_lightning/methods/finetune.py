"""Full fine-tuning: the baseline every table compares against. Every backbone weight trains.

Trainable parameters: all of the backbone except its unused pooler + the head (hidden x C + C).
"""
from peft_lightning.methods.base import PeftClassifier


class FineTune(PeftClassifier):
    def build(self) -> None:
        self.backbone.requires_grad_(True)
