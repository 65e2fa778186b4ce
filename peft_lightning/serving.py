"""Many tasks on one frozen backbone: each example of a batch runs with its own task's prefix.

Prefix-Tuning's argument for PEFT is exactly this: one copy of the backbone, a small file per
task, and batches that mix tasks. Deep prefixes make it cheap: the prefix is just the keys/values
an example attends to, so a batch can carry a different prefix per row (the attention kernel
takes keys of shape (batch, heads, P, head_dim)), and tasks with different prefix lengths are
padded to the longest with masked-out positions, which leaves the shorter ones exact.

    model = MultiTaskModel({"sentiment": "runs/a/adapter", "spam": "runs/b/adapter"})
    logits = model(batch, tasks=["spam", "sentiment", ...])   # one tensor per example

(IA)^3 adapters mix the same way: each example's keys, values and feed-forward activations are
scaled by its own task's vectors (a (batch, width) table gathered per batch). A model serves one
kind: deep prefixes or (IA)^3 vectors.

Prompt ensembling (Lester et al.) is the same thing with several prompts of one task:
`ensemble(model, batch, members)` runs every member on every example in one forward pass.

A batch of one task takes a fast path: that task's prefix once, unpadded and broadcast over the
rows (no per-row copy, no prefix mask), and its head on the whole batch; it computes exactly what
the task's own module computes alone. Mixed batches gather each row's prefix; their rows are
grouped by task with one sort, so each head runs once on a contiguous block.

Verbalizer heads (label words through the LM head) read a [MASK] token their module inserts into
the input before the backbone runs; the server inserts it too, so a model serves verbalizer heads
or other heads, not both (one batch cannot both carry the token and leave it out).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peft_lightning.checkpoint import load_pretrained
from peft_lightning.injection.prefix import PrefixState
from peft_lightning.injection.prefix_encoder import prefix_state
from peft_lightning.tasks.heads import Verbalizer

PREFIX_METHODS = ("ptuning_v2", "prefix_tuning")
MIXABLE = (*PREFIX_METHODS, "ia3")


class MultiTaskModel(nn.Module):
    def __init__(self, adapters: dict[str, str | Path]):
        super().__init__()
        if not adapters:
            raise ValueError("MultiTaskModel needs at least one adapter directory")
        self.tasks = list(adapters)
        self.heads = nn.ModuleDict()
        self.labels: dict[str, list[str] | None] = {}
        prefixes: dict[str, PrefixState] = {}
        vectors: dict[str, dict[str, torch.Tensor]] = {}
        first = None
        for task, directory in adapters.items():
            module = load_pretrained(directory)
            method = module.hparams.method["name"]
            if method not in MIXABLE or (method in PREFIX_METHODS and module.prefix is None):
                raise ValueError(f"task {task!r}: mixed-task batches need deep prefixes ({', '.join(PREFIX_METHODS)} "
                                 f"with depth deep or a layer list) or ia3; {directory} holds method={method}")
            if first is None:
                first = module
                self.backbone = module.backbone  # shared; the other tasks' copies are dropped
                self.kind = "ia3" if method == "ia3" else "prefix"
            elif module.hparams.model != first.hparams.model:
                raise ValueError(f"task {task!r} was trained on model {module.hparams.model}, "
                                 f"task {self.tasks[0]!r} on {first.hparams.model}: one backbone serves them all")
            elif isinstance(module.head, Verbalizer) != isinstance(first.head, Verbalizer):
                raise ValueError(f"task {task!r} and task {self.tasks[0]!r}: one has a verbalizer head (it reads a [MASK] "
                                 "token inserted into the input), the other not: serve them in separate models")
            elif module.hparams.model.get("config") is not None and not _same_weights(module.backbone, first.backbone):
                # (the same settings, another draw: each adapter carries its random backbone's weights)
                raise ValueError(f"task {task!r} was trained on a randomly initialised backbone (model.config) with "
                                 f"other weights than task {self.tasks[0]!r} (another seed?): one backbone serves "
                                 "them all")
            elif (method == "ia3") != (self.kind == "ia3"):
                raise ValueError(f"task {task!r} holds method={method}, task {self.tasks[0]!r} "
                                 f"{first.hparams.method['name']}: one model serves deep prefixes or (IA)^3, not both")
            elif self.kind == "prefix" and module.prefix.slots != first.prefix.slots:
                raise ValueError(f"task {task!r} has prefixes in attention slots {module.prefix.slots}, "
                                 f"task {self.tasks[0]!r} in {first.prefix.slots}: they must match")
            module.eval()
            if self.kind == "ia3":
                vectors[task] = {key: scale.vector.detach() for key, scale in module.ia3.items()}
            else:
                with torch.no_grad():
                    prefixes[task] = module.prefix(1)  # computed once: no reparameterization at serving time
            self.heads[task] = module.head
            self.labels[task] = module.hparams.labels
        self.run_backbone = first.run_backbone
        self.eval()
        if self.kind == "ia3":
            # the first task's Scale modules (hooked into the shared backbone) read each batch's
            # rows from these tables: per target, (tasks, width)
            self.scales = first.ia3
            self.vectors = nn.Module()
            for key in self.scales:
                self.vectors.register_buffer(key, torch.stack([vectors[t][key] for t in self.tasks]), persistent=False)
            return
        self.slots = first.prefix.slots
        self.longest = max(next(iter(s.keys.values())).shape[-2] for s in prefixes.values())
        # per task: keys/values padded to the longest prefix, (slots, 2, heads, longest, head_dim)
        stacked, lengths = [], []
        for task in self.tasks:
            state = prefixes[task]
            kv = torch.stack([torch.stack([state.keys[s][0], state.values[s][0]]) for s in self.slots])
            lengths.append(kv.shape[-2])
            stacked.append(nn.functional.pad(kv, (0, 0, 0, self.longest - kv.shape[-2])))
        self.register_buffer("kv", torch.stack(stacked), persistent=False)  # (tasks, slots, 2, H, P, D)
        self.register_buffer("prefix_mask", torch.arange(self.longest)[None] < torch.tensor(lengths)[:, None],
                             persistent=False)
        self.lengths = lengths

    def task_index(self, tasks: list[str]) -> torch.Tensor:
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; this model serves {self.tasks}")
        device = next(self.backbone.parameters()).device
        return torch.tensor([self.tasks.index(t) for t in tasks], device=device)

    def prefix_for(self, index: torch.Tensor) -> PrefixState:
        """Each row's task's prefix, (batch, H, longest, D) per slot, shorter ones masked (the
        gather multi-task training uses too)."""
        return prefix_state(self.kv[index], self.slots, len(index), mask=self.prefix_mask[index])

    def task_prefix(self, task: int) -> PrefixState:
        """One task's prefix for every row: (1, H, P_task, D) views of the stored table, no mask."""
        kv = self.kv[task, :, :, :, :self.lengths[task]]  # (slots, 2, H, P_task, D)
        keys = {slot: kv[i, 0][None] for i, slot in enumerate(self.slots)}
        values = {slot: kv[i, 1][None] for i, slot in enumerate(self.slots)}
        return PrefixState(keys, values)

    def hidden(self, batch: dict[str, torch.Tensor], index: torch.Tensor, single: bool) -> torch.Tensor:
        """The backbone's hidden states, each row with its task's prefix or (IA)^3 vectors."""
        if self.kind == "prefix":
            return self.run_backbone(batch, prefix=self.task_prefix(int(index[0])) if single
                                     else self.prefix_for(index))
        rows = index[0] if single else index  # one vector for the batch, or one per row
        try:
            for key, scale in self.scales.items():
                scale.rows = getattr(self.vectors, key)[rows]
            return self.run_backbone(batch)
        finally:
            for scale in self.scales.values():
                scale.rows = None

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], tasks: list[str]) -> list[torch.Tensor]:
        """Logits per example (tasks may have different label sets), one backbone pass."""
        if len(tasks) != batch["input_ids"].shape[0]:
            raise ValueError(f"{len(tasks)} task names for a batch of {batch['input_ids'].shape[0]} examples")
        index = self.task_index(tasks)
        head = self.heads[self.tasks[0]]
        if isinstance(head, Verbalizer):  # (every head is one then) as the task's module does before its backbone pass
            batch = head.with_mask_token(batch)
        mask = batch["attention_mask"]
        if len(set(tasks)) == 1:
            task = int(index[0])
            hidden = self.hidden(batch, index, single=True)
            return list(self.heads[self.tasks[task]](hidden, mask).unbind(0))
        hidden = self.hidden(batch, index, single=False)
        # rows grouped by task (stable: each block keeps the batch's row order), one head call per block
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=len(self.tasks)).tolist()
        blocks = zip(self.tasks, hidden[order].split(counts), mask[order].split(counts))
        grouped = [row for task, h, m in blocks if len(h) for row in self.heads[task](h, m).unbind(0)]
        out: list[torch.Tensor | None] = [None] * len(tasks)
        for row, logits in zip(order.tolist(), grouped):
            out[row] = logits
        return out


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    theirs = b.state_dict()
    return all(torch.equal(v, theirs[k]) for k, v in a.state_dict().items())


@torch.no_grad()
def ensemble(model: MultiTaskModel, batch: dict[str, torch.Tensor], members: list[str]) -> dict[str, torch.Tensor]:
    """Every member prompt (a task of `model`, all with one label set) on every example, in one
    forward pass. Returns each member's probabilities (members, batch, labels), their mean and
    the majority vote (ties go to the mean's choice)."""
    n, k = batch["input_ids"].shape[0], len(members)
    repeated = {key: value.repeat(k, *[1] * (value.dim() - 1)) for key, value in batch.items()}
    logits = torch.stack(model(repeated, [m for m in members for _ in range(n)]))
    probs = logits.softmax(-1).view(k, n, -1)
    mean = probs.mean(0)
    votes = nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0).float()
    votes += mean * 1e-3  # break ties by the mean probability
    return {"members": probs, "mean": mean, "vote": votes.argmax(-1)}


