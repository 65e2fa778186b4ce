"""Classification heads, a knob of every method (`method.head.type`):

  linear      a randomly initialised linear layer on one pooled hidden state (our default):
              the first token (encoders), the last real token (decoders, whose first token sees
              nothing else; encoder-decoders, as BART's classifier) or the mean of real tokens
  pooler      the official P-Tuning v2 head: the backbone's own pooler (BERT, RoBERTa: dense +
              tanh on the first token; frozen, like the rest of the backbone), then dropout and a
              randomly initialised linear layer. Pretrained in BERT (next-sentence prediction);
              absent from RoBERTa checkpoints (initialised at random) and untrained in the
              embedded MiniLM: a warning says when the pooler looks untrained
  token       (token classification) a linear layer on every token's hidden state
  verbalizer  no new parameters: the backbone's own (frozen) LM head scores one label word per
              class (Prompt Tuning, P-Tuning). Encoders read a [MASK] token inserted before the
              final separator; decoders read the next-token prediction after the last real token.
"""
from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("auto", "first", "last", "mean")
HEAD_TYPES = ("linear", "pooler", "verbalizer")


def last_real(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (right padding)."""
    return attention_mask.sum(1).clamp(min=1) - 1


class ClassificationHead(nn.Module):
    def __init__(self, hidden: int, num_labels: int, dropout: float, pooling: str = "first"):
        super().__init__()
        if pooling not in POOLINGS[1:]:
            raise ValueError(f"method.head.pooling must be one of {POOLINGS}, got '{pooling}'")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "first":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_real(attention_mask)]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return self.linear(self.dropout(pooled))


class PoolerHead(nn.Module):
    """Linear on the backbone's pooler output (P-Tuning v2's `self.classifier(self.dropout(outputs[1]))`,
    model/sequence_classification.py of THUDM/P-tuning-v2). `pooler` is the backbone's own module,
    shared, not copied: its weights stay frozen and are not saved with the adapter (a fresh backbone
    brings them)."""

    def __init__(self, pooler: nn.Module, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.pooler = pooler
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(self.pooler(hidden)))


class TokenHead(nn.Module):
    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(hidden))


class Verbalizer(nn.Module):
    """Label-word scores from a frozen LM head: logits (batch, num_labels)."""

    def __init__(self, lm_head: nn.Module, label_word_ids: list[int], mask_token_id: int | None,
                 shared: set[int] = frozenset()):
        super().__init__()
        self.lm_head = lm_head
        for p in lm_head.parameters():  # frozen, except weights tied to the backbone (they follow it)
            if id(p) not in shared:
                p.requires_grad_(False)
        self.register_buffer("label_word_ids", torch.tensor(label_word_ids), persistent=False)
        self.mask_token_id = mask_token_id  # None: a decoder, read the next-token prediction

    def with_mask_token(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoders: the batch with [MASK] inserted before each row's final separator token, so
        "[CLS] text [SEP]" becomes "[CLS] text [MASK] [SEP]"."""
        if self.mask_token_id is None:
            return batch
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = torch.arange(ids.shape[0], device=ids.device)
        last = last_real(mask)
        out = dict(batch)
        def grow(t):  # one more column
            return torch.cat([t, t[:, -1:]], dim=1)

        new_ids = grow(ids).clone()
        new_ids[rows, last + 1] = ids[rows, last]  # the separator moves right
        new_ids[rows, last] = self.mask_token_id
        new_mask = grow(mask).clone()
        new_mask[rows, last + 1] = 1
        out["input_ids"], out["attention_mask"] = new_ids, new_mask
        if "token_type_ids" in batch:
            types = grow(batch["token_type_ids"]).clone()
            types[rows, last + 1] = batch["token_type_ids"][rows, last]
            out["token_type_ids"] = types
        return out

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`hidden` and `attention_mask` of the batch `with_mask_token` returned."""
        position = last_real(attention_mask) - (1 if self.mask_token_id is not None else 0)
        read = hidden[torch.arange(hidden.shape[0], device=hidden.device), position]
        return self.lm_head(read)[:, self.label_word_ids]
