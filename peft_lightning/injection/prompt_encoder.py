"""Prompt encoders: where the learned virtual-token vectors come from.

One module for every prompt method. `reparameterization` picks how the P vectors are produced:
  none: a free table of P x out_dim parameters (P-Tuning v2, prefix tuning without projection);
  mlp:  a P x embed_dim table passed through Linear-Tanh-Linear (Li & Liang's reparameterization);
  lstm: a P x embed_dim table through a 2-layer biLSTM and a Linear-ReLU-Linear head (P-Tuning).
The reparameterization network exists to ease optimization; after training it can be ejected into
a flat table (`eject_reparameterization`) that gives identical outputs at a fraction of the size.
"""
from __future__ import annotations

import torch
from torch import nn

REPARAMETERIZATIONS = ("none", "mlp", "lstm")


class PromptEncoder(nn.Module):
    def __init__(
        self,
        num_tokens: int,
        out_dim: int,
        reparameterization: str = "none",
        hidden_size: int = 512,
        embed_dim: int | None = None,
        init_std: float = 1.0,
    ):
        super().__init__()
        if reparameterization not in REPARAMETERIZATIONS:
            raise ValueError(
                f"reparameterization must be one of {REPARAMETERIZATIONS}, got '{reparameterization}'"
            )
        self.num_tokens, self.out_dim = num_tokens, out_dim
        self.reparameterization = reparameterization
        self.net: nn.Module | None = None
        if reparameterization == "none":
            self.embedding = nn.Embedding(num_tokens, out_dim)
        else:
            embed_dim = embed_dim or hidden_size
            self.embedding = nn.Embedding(num_tokens, embed_dim)
            if reparameterization == "mlp":
                self.net = nn.Sequential(
                    nn.Linear(embed_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, out_dim)
                )
            else:
                self.net = _LSTMHead(embed_dim, hidden_size, out_dim)
        nn.init.normal_(self.embedding.weight, std=init_std)

    def forward(self) -> torch.Tensor:
        """(num_tokens, out_dim) prompt vectors. At evaluation (eval mode, no gradients) the
        reparameterization network runs once, not per batch: its output is cached until a
        parameter changes. A change is an in-place update (optimizer step, load_state_dict:
        the version counter) or new storage (`.to(dtype/device)` swaps `.data`: the data
        pointer, dtype and device). Edits through `p.data` bypass version counters: call
        `clear_cache()` after them."""
        table = self.embedding.weight
        if self.net is None:
            return table
        if self.training or torch.is_grad_enabled():
            return self.net(table)
        key = tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in self.parameters())
        if getattr(self, "_cache_key", None) != key:
            self._cache, self._cache_key = self.net(table), key
        return self._cache

    def clear_cache(self) -> None:
        self._cache = self._cache_key = None

    @torch.no_grad()
    def eject_reparameterization(self) -> None:
        """Replace the reparameterization network by the flat table it currently produces."""
        if self.net is None:
            return
        flat = self.forward().detach().clone()
        self.embedding = nn.Embedding(self.num_tokens, self.out_dim).to(flat.device, flat.dtype)
        self.embedding.weight.copy_(flat)
        self.net = None
        self.reparameterization = "none"


class _LSTMHead(nn.Module):
    """P-Tuning's prompt encoder: biLSTM over the virtual tokens, then a two-layer MLP."""

    def __init__(self, embed_dim: int, hidden_size: int, out_dim: int):
        super().__init__()
        self.lstm = nn.LSTM(embed_dim, hidden_size // 2, num_layers=2, bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_size // 2 * 2, hidden_size), nn.ReLU(), nn.Linear(hidden_size, out_dim))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.lstm(table[None])[0][0])
