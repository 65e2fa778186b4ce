"""Modules attached to a frozen backbone through forward hooks: bottleneck adapters (Houlsby et
al., 2019; Pfeiffer et al., 2021), LoRA (Hu et al., 2022), DoRA (Liu et al., 2024) and (IA)^3's
scaling vectors (Liu et al., 2022).

The backbone's own modules are never replaced or modified: a hook changes a module's output (or,
for (IA)^3 on the feed-forward, its input), and the learned modules live in the method (so its
state dict holds only them). All start as exact identities (adapter up-projection and LoRA B are
zero, DoRA's magnitude is the weight's own norm, (IA)^3 vectors are ones), so at initialization
the model computes what the frozen backbone computes, bit for bit. Works for `nn.Linear` and
GPT-2's `Conv1D`. An optional input-dependent gate sigmoid(w.x + b) scales the learned term (UniPELT).
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


def weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear or Conv1D as out x in."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


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

    def hook(self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output with the update: out + (alpha / r) B A x."""
        return out + self(x)


class DoRA(LoRA):
    """DoRA: the updated weight W' = W + (alpha / r) B A split into direction and magnitude, each row
    (output feature) of W' normalised and rescaled by a learned magnitude m, initialised to W's row
    norms (so W' = W at the start):  y = m / ||W'||_row * W' x + b.  As peft's `use_dora`, the norm
    is a constant in backward (detached: the paper's section 4.3), and with dropout on in training
    the frozen path sees the dropped input too. Parameters: r x (in + out) + out."""

    def __init__(self, layer: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(*features(layer), r, alpha, dropout)
        self.magnitude = nn.Parameter(self.norm(layer))

    @torch.no_grad()
    def norm(self, layer: nn.Module) -> torch.Tensor:
        return torch.linalg.norm(weight(layer) + self.scaling * (self.B @ self.A), dim=1)

    def hook(self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout.p > 0:
            x = self.dropout(x)
            frozen = nn.functional.linear(x, weight(layer))  # W x on the dropped input
        else:
            frozen = out if layer.bias is None else out - layer.bias  # W x, without a second matmul
        scale = self.magnitude / self.norm(layer)
        # (m / n - 1) W x + (m / n) s B A x: zero at initialization, where m = n and B = 0
        delta = (scale - 1) * frozen + scale * ((x @ self.A.T @ self.B.T) * self.scaling)
        return out + delta.to(out.dtype)


class Scale(nn.Module):
    """(IA)^3's learned vector l: x -> x * l over the last dimension (from `start` on: the key and
    value thirds of GPT-2's fused q/k/v output), initialised to ones. Parameters: width.
    `on_input`: it scales its layer's input (the feed-forward's intermediate activation), not its
    output. While `rows` is set, it replaces l: (width,) for the whole batch or (batch, width), one
    vector per example (mixed-task serving)."""

    def __init__(self, width: int, start: int = 0, on_input: bool = False):
        super().__init__()
        self.vector = nn.Parameter(torch.ones(width))
        self.start, self.on_input = start, on_input
        self.rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vector = self.vector if self.rows is None else self.rows
        if vector.dim() == 2:
            if x.dim() != 3 or x.shape[0] != vector.shape[0]:
                raise ValueError(f"a vector per example needs (batch={vector.shape[0]}, seq, width) inputs, got "
                                 f"{tuple(x.shape)} (DeBERTa's shared position keys?): serve one task per batch")
            vector = vector[:, None]
        if self.start:
            return torch.cat([x[..., :self.start], (x[..., self.start:] * vector).to(x.dtype)], dim=-1)
        return (x * vector).to(x.dtype)


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
                gated: bool = False, dora: bool = False) -> nn.ModuleDict:
    """LoRA (DoRA with `dora`) on every Linear/Conv1D matching `patterns`; returns the modules to own."""
    targets = [(n, m) for n, m in matching_modules(model, patterns)
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    if not targets:
        raise ValueError(
            f"no Linear layer of {model.config.model_type} matches method.target_modules {list(patterns)}"
        )
    loras = nn.ModuleDict()
    for name, module in targets:
        lora = loras[_key(name)] = (DoRA(module, r, alpha, dropout) if dora
                                    else LoRA(*features(module), r, alpha, dropout, gated))
        module.register_forward_hook(lambda m, args, out, lo=lora: lo.hook(m, args[0], out))
    return loras


def attach_scales(model: nn.Module, outputs, inputs, fused_qkv: bool = False) -> nn.ModuleDict:
    """(IA)^3: a `Scale` on the output of every Linear/Conv1D matching `outputs` (keys, values;
    with `fused_qkv`, the k and v parts of a q/k/v projection) and on the input of every one
    matching `inputs` (the feed-forward's output projection: its input is the intermediate
    activation). Returns them to own."""
    scales = nn.ModuleDict()
    for patterns, on_input in ((outputs, False), (inputs, True)):
        targets = matching_modules(model, patterns)
        if not targets:
            raise ValueError(f"no module of {model.config.model_type} matches (IA)^3 targets {list(patterns)}")
        for name, module in targets:
            d_in, d_out = features(module)
            if on_input:
                scale = scales[_key(name)] = Scale(d_in, on_input=True)
                module.register_forward_pre_hook(lambda _m, args, s=scale: (s(args[0]), *args[1:]))
            else:
                start = d_out // 3 if fused_qkv else 0
                scale = scales[_key(name)] = Scale(d_out - start, start)
                module.register_forward_hook(lambda _m, _args, out, s=scale: s(out))
    return scales
