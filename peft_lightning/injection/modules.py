"""Additive modules attached to a frozen backbone through forward hooks: bottleneck adapters
(Houlsby et al., 2019; Pfeiffer et al., 2021) and LoRA (Hu et al., 2022).

The backbone's own modules are never replaced or modified: a hook adds the learned term to a
module's output, and the learned modules live in the method (so its state dict holds only them).
Both start as exact identities (adapter up-projection and LoRA B are zero), so at initialization
the model computes what the frozen backbone computes. Works for `nn.Linear` and GPT-2's `Conv1D`.
An optional input-dependent gate sigmoid(w.x + b) scales the learned term (UniPELT).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from peft_lightning.injection.architectures import matching_modules

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or a transformers Conv1D (weight stored as in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"cannot attach to {type(module).__name__}: only Linear and Conv1D layers")


class Gate(nn.Module):
    """UniPELT's gate: a per-token scalar in (0, 1) computed from the module's input."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


class Adapter(nn.Module):
    """x -> x + up(act(down(x))), applied to a sublayer's output before its residual connection.
    Parameters: 2 x dim x bottleneck + bottleneck + dim (+ dim + 1 with a gate)."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu", gated: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"method.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.gate = Gate(dim) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(x)))
        return x + (delta if self.gate is None else self.gate(x) * delta)


class LoRA(nn.Module):
    """The low-rank update (alpha / r) x B A x for a layer with weight out x in.
    Parameters: r x (in + out) (+ in + 1 with a gate)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 gated: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"method.r must be a positive integer, got {r}")
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear (and HF peft)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.gate = Gate(in_features) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.dropout(x) @ self.A.T @ self.B.T) * self.scaling
        return delta if self.gate is None else self.gate(x) * delta


def _key(name: str) -> str:
    return name.replace(".", "-")  # ModuleDict keys cannot hold dots


def attach_adapters(model: nn.Module, patterns, bottleneck: int, activation: str = "gelu",
                    gated: bool = False) -> nn.ModuleDict:
    """An adapter on the output of every module matching `patterns`; returns them to own."""
    targets = matching_modules(model, patterns)
    if not targets:
        raise ValueError(f"no module of {model.config.model_type} matches adapter targets {list(patterns)}")
    adapters = nn.ModuleDict()
    for name, module in targets:
        adapter = adapters[_key(name)] = Adapter(features(module)[1], bottleneck, activation, gated)
        module.register_forward_hook(lambda _m, _args, out, a=adapter: a(out))
    return adapters


def attach_lora(model: nn.Module, patterns, r: int, alpha: float, dropout: float = 0.0,
                gated: bool = False) -> nn.ModuleDict:
    """LoRA on every Linear/Conv1D matching `patterns`; returns the LoRA modules to own."""
    targets = [(n, m) for n, m in matching_modules(model, patterns)
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    if not targets:
        raise ValueError(
            f"no Linear layer of {model.config.model_type} matches method.target_modules {list(patterns)}"
        )
    loras = nn.ModuleDict()
    for name, module in targets:
        lora = loras[_key(name)] = LoRA(*features(module), r, alpha, dropout, gated)
        module.register_forward_hook(lambda _m, args, out, lo=lora: out + lo(args[0]))
    return loras
