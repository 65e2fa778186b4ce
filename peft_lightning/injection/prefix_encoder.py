"""Deep prompts: P virtual tokens turned into per-layer attention keys and values.

A free prefix table (no reparameterization) is stored in key/value layout, (slots, 2, kv_heads, P,
head_dim): each slot's keys and values are then contiguous (kv_heads, P, head_dim) views of the
parameter, in the layout the attention kernel takes, with no permute or strided copy per step,
and their gradients land in the parameter without one. Saved files keep the flat layout, token ->
(slot, key|value, head, head_dim), as P-Tuning v2 and HF peft store it: `state_dict` writes it and
`load_state_dict` reads it (old adapters and checkpoints load unchanged; `kv_optimizer_state` does
the same for the optimizer's moments in a checkpoint).
"""
from __future__ import annotations

import torch
from torch import nn

from peft_lightning.injection.prefix import PrefixState
from peft_lightning.injection.prompt_encoder import PromptEncoder


def flat_to_kv(flat: torch.Tensor, slots: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """(P, slots x 2 x kv_heads x head_dim) -> contiguous (slots, 2, kv_heads, P, head_dim)."""
    return flat.reshape(flat.shape[0], slots, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()


def kv_to_flat(kv: torch.Tensor) -> torch.Tensor:
    """The inverse of `flat_to_kv`: (slots, 2, kv_heads, P, head_dim) -> contiguous (P, ...)."""
    return kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1)


class KVTable(nn.Module):
    """The free prefix table, `weight` in key/value layout, read and written flat (see above)."""

    def __init__(self, flat: torch.Tensor, slots: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.shape = (slots, kv_heads, head_dim)
        self.weight = nn.Parameter(flat_to_kv(flat, *self.shape))
        self.register_state_dict_post_hook(_save_flat)
        self.register_load_state_dict_pre_hook(_load_flat)

    def flat(self) -> torch.Tensor:
        return kv_to_flat(self.weight)


def _save_flat(module: KVTable, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + "weight"] = kv_to_flat(state_dict[prefix + "weight"].detach())


def _load_flat(module: KVTable, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
               error_msgs) -> None:
    value = state_dict.get(prefix + "weight")
    if value is not None and value.dim() == 2:  # (a 5-D value is already in our layout)
        flat = torch.Size((module.weight.shape[3], module.weight.numel() // module.weight.shape[3]))
        if value.shape != flat:  # say it in the flat layout the file holds, as torch says a size mismatch
            error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape {value.shape} from "
                              f"checkpoint, the shape in current model is {flat}.")
            state_dict.pop(prefix + "weight")
            return
        state_dict[prefix + "weight"] = flat_to_kv(value, *module.shape)


class KVPrompt(nn.Module):
    """A PromptEncoder without reparameterization whose table is a KVTable: the same interface
    (`embedding.weight`, `net`, `forward()` giving the flat table, `eject_reparameterization`)."""

    reparameterization = "none"
    net = None

    def __init__(self, flat: torch.Tensor, slots: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.num_tokens, self.out_dim = flat.shape
        self.embedding = KVTable(flat, slots, kv_heads, head_dim)

    def forward(self) -> torch.Tensor:
        """(P, out_dim), the flat table (a copy, for export and inspection)."""
        return self.embedding.flat()

    def kv(self) -> torch.Tensor:
        return self.embedding.weight

    @torch.no_grad()
    def set_flat(self, flat: torch.Tensor) -> None:
        self.embedding.weight.copy_(flat_to_kv(flat, *self.embedding.shape))

    def eject_reparameterization(self) -> None:
        pass


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
        if reparameterization == "none":
            self._to_kv_layout()  # (the table was drawn flat: the same numbers as before for a seed)
        self.dropout = nn.Dropout(dropout)

    def _to_kv_layout(self) -> None:
        flat = self.encoder.embedding.weight.detach()
        self.encoder = KVPrompt(flat, len(self.slots), self.kv_heads, self.head_dim)

    def kv(self) -> torch.Tensor:
        """All prefixes, (slots, 2, kv_heads, P, head_dim): the parameter itself for a free table."""
        if isinstance(self.encoder, KVPrompt):
            return self.encoder.kv()
        flat = self.encoder()  # (P, S * 2 * H * D) from the reparameterization network
        return flat.view(self.prefix_length, len(self.slots), 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    def forward(self, batch_size: int, mask: torch.Tensor | None = None) -> PrefixState:
        return prefix_state(self.kv()[None], self.slots, batch_size, self.dropout.p if self.training else 0.0, mask)

    def eject_reparameterization(self) -> None:
        if isinstance(self.encoder, KVPrompt):
            return
        self.encoder.eject_reparameterization()
        self._to_kv_layout()


def prefix_state(kv: torch.Tensor, slots: list[int], batch_size: int, dropout: float = 0.0,
                 mask: torch.Tensor | None = None) -> PrefixState:
    """The PrefixState of key/value tables `kv`, (1 or batch_size, S, 2, H, P, D): one prefix for
    every row, or each row's own (mixed-task batches: the row's task's table, `tables[task_of_row]`,
    as serving.MultiTaskModel and multi-task training gather them), each row's copy dropped out
    independently with probability `dropout` (training)."""
    if dropout > 0:
        # P-Tuning v2 drops out each example's copy of the prefix independently. (nn.Dropout,
        # as it was applied to the flat table's view: the noise laid out token-major, as
        # empty_like made it then, so a seed draws the same masks as before the layout change.)
        S, _, H, P, D = kv.shape[1:]
        noise = kv.new_empty(batch_size, P, S, 2, H, D).permute(0, 2, 3, 4, 1, 5)
        kv = kv * noise.bernoulli_(1 - dropout).div_(1 - dropout)
    # unbind, not indexing: its backward stacks the slots' gradients once, where indexing
    # would fill a zero tensor of the whole table per slot
    keys, values = {}, {}
    for slot, pair in zip(slots, kv.unbind(1)):
        keys[slot], values[slot] = pair.unbind(1)
    return PrefixState(keys, values, mask)


def kv_optimizer_state(optimizer: torch.optim.Optimizer, table: KVTable) -> None:
    """Make `optimizer.state_dict()` hold `table`'s per-parameter state (Adam's moments) flat,
    as `table.state_dict()` holds the table, and `load_state_dict` accept it flat: a checkpoint
    written before the table moved to key/value layout resumes exactly."""
    weight = table.weight
    flat_shape = (weight.shape[3], weight.numel() // weight.shape[3])

    def index(opt, state_dict) -> int | None:
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in opt.param_groups for p in group["params"]]
        return next((i for i, p in zip(ids, params) if p is weight), None)

    def convert(state_dict, index, shape, fn):
        if index is None or index not in state_dict["state"]:
            return state_dict
        entry = {k: fn(v) if torch.is_tensor(v) and tuple(v.shape) == shape else v
                 for k, v in state_dict["state"][index].items()}
        return {**state_dict, "state": {**state_dict["state"], index: entry}}

    def save(opt, state_dict):
        return convert(state_dict, index(opt, state_dict), tuple(weight.shape), kv_to_flat)

    def load(opt, state_dict):
        return convert(state_dict, index(opt, state_dict), flat_shape, lambda v: flat_to_kv(v, *table.shape))

    optimizer.register_state_dict_post_hook(save)
    optimizer.register_load_state_dict_pre_hook(load)
