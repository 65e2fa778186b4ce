"""(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors rescale, element by element, the keys and values of every
attention module (self and cross; the projection's output, bias included, as peft) and the
feed-forward's intermediate activation (the input of its output projection). The vectors start
at ones, so training starts from the backbone bit for bit. GPT-2's fused q/k/v projection gets a
vector on its key and value thirds only.

Trainable parameters: per attention module 2 x d (d: the key/value width, H, or
num_key_value_heads x head_dim under grouped-query attention), per feed-forward block its
intermediate width f; plus the head H x C + C. A decoder or an encoder with L layers:
L x (2d + f) + head (MiniLM: 6 x (2 x 384 + 1536) = 13,824); an encoder-decoder with L layers
per stack: 3L attention modules and 2L feed-forwards.
"""
from peft_lightning.injection.architectures import architecture
from peft_lightning.injection.modules import attach_scales
from peft_lightning.methods.base import PeftClassifier


class IA3(PeftClassifier):
    def build(self) -> None:
        arch = architecture(self.backbone.config.model_type, "(IA)^3")
        self.ia3 = attach_scales(self.backbone, arch.key_value, [arch.adapter_targets["ffn"]], arch.fused_qkv)
