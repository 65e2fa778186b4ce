"""Deep prompts: P virtual tokens turned into per-layer attention keys and values."""
from __future__ import annotations

import torch
from torch import nn

from peft_lightning.injection.prefix import PrefixState
from peft_lightning.injection.prompt_encoder import PromptEncoder


class PrefixEncoder(nn.Module):
    """Learned key/value prefixes for the attention slots in `slots`.

    Trainable parameters without reparameterization: P x len(slots) x 2 x kv_heads x head_dim
    (for BERT-like models kv_heads x head_dim = hidden, giving P-Tuning v2's P x 2 x layers x hidden).
    """

    def __init__(
        self,
        prefix_length: int,
        slots: list[int],
        kv_heads: int,
        head_dim: int,
        reparameterization: str = "none",
        reparam_hidden: int = 512,
        embed_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.prefix_length, self.slots = prefix_length, list(slots)
        self.kv_heads, self.head_dim = kv_heads, head_dim
        out_dim = len(self.slots) * 2 * kv_heads * head_dim
        self.encoder = PromptEncoder(prefix_length, out_dim, reparameterization, reparam_hidden, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch_size: int, mask: torch.Tensor | None = None) -> PrefixState:
        flat = self.encoder()  # (P, S * 2 * H * D)
        kv = flat.view(self.prefix_length, len(self.slots), 2, self.kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 3, 0, 4)[None]  # (1, S, 2, H, P, D)
        if self.training and self.dropout.p > 0:
            # P-Tuning v2 drops out each example's copy of the prefix independently
            kv = self.dropout(kv.expand(batch_size, -1, -1, -1, -1, -1))
        keys = {slot: kv[:, i, 0] for i, slot in enumerate(self.slots)}
        values = {slot: kv[:, i, 1] for i, slot in enumerate(self.slots)}
        return PrefixState(keys, values, mask)

    def eject_reparameterization(self) -> None:
        self.encoder.eject_reparameterization()
