"""Token classification (NER): one tag per word, scored at each word's first sub-token.

Labels sit on the tokenizer's sub-tokens: a word's tag on its first piece, -100 (ignored) on the
other pieces, special tokens and padding. Every word is encoded as a word start: byte-level BPE
tokenizers (RoBERTa, GPT-2, BART) get `add_prefix_space` (`backbone.for_split_words`). Methods hand back hidden states aligned with the input
tokens (prompt positions are stripped in `run_backbone`), so virtual tokens never shift a label.
Entity-level precision/recall/F1 come from `seqeval` (CoNLL evaluation, BIO/IOB2 spans).
"""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from transformers import DataCollatorForTokenClassification

from peft_lightning.backbone import for_split_words
from peft_lightning.errors import ConfigError, DataError
from peft_lightning.tasks.base import Task
from peft_lightning.tasks.heads import TokenHead

IGNORE = -100
_END = -1  # sequence separator in the metric's flat state (DDP gathers tensors, not lists)


class EntityF1(Metric):
    """seqeval's entity-level scores over word-level tag sequences."""

    full_state_update = False

    def __init__(self, tags: list[str], score: str = "f1"):
        super().__init__()
        self.tags, self.score = tags, score
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        predicted = logits.argmax(-1)
        for p, y in zip(predicted, labels):
            keep = y != IGNORE
            end = torch.tensor([_END], device=y.device)
            self.preds.append(torch.cat([p[keep], end]))
            self.target.append(torch.cat([y[keep], end]))

    def compute(self) -> torch.Tensor:
        from seqeval.metrics import f1_score, precision_score, recall_score

        preds = torch.cat(self.preds) if isinstance(self.preds, list) and self.preds else self.preds
        target = torch.cat(self.target) if isinstance(self.target, list) and self.target else self.target
        if isinstance(preds, list):  # nothing seen
            return torch.tensor(0.0)
        y_pred, y_true = self._sequences(preds), self._sequences(target)
        fn = {"f1": f1_score, "precision": precision_score, "recall": recall_score}[self.score]
        return torch.tensor(float(fn(y_true, y_pred, zero_division=0)))

    def _sequences(self, flat: torch.Tensor) -> list[list[str]]:
        out, current = [], []
        for i in flat.tolist():
            if i == _END:
                out.append(current)
                current = []
            else:
                current.append(self.tags[i])
        return out


class TokenClassification(Task):
    roles = ("tokens", "label")
    optional_roles = ()
    metric = "f1"

    def label_value(self, value, where):
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise DataError(f"{where}: token_classification labels must be a list of tags, got {value!r}")
        return [super(TokenClassification, self).label_value(tag, f"{where}, tag {i}") for i, tag in enumerate(value)]

    def tokenize(self, rows, tokenizer, max_length):
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"token_classification needs a fast tokenizer (word ids); {type(tokenizer).__name__} is not")
        tokenizer = for_split_words(tokenizer)
        enc = tokenizer(rows["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        labels = []
        for i, tags in enumerate(rows["label"]):
            if len(tags) != len(rows["tokens"][i]):
                raise DataError(f"row {i}: {len(rows['tokens'][i])} words but {len(tags)} tags")
            previous, aligned = None, []
            for word in enc.word_ids(i):
                aligned.append(IGNORE if word is None or word == previous else tags[word])
                previous = word
            labels.append(aligned)
        enc["labels"] = labels
        return enc

    def collator(self, tokenizer):
        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)

    def head(self, hidden: int, head_cfg: dict, kind: str) -> nn.Module:
        return TokenHead(hidden, len(self.labels), head_cfg.get("dropout", 0.1))

    def loss(self, logits, batch):
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def loss_terms(self, batch):
        return int((batch["labels"] != IGNORE).sum())

    def metrics(self) -> MetricCollection:
        return MetricCollection({
            "f1": EntityF1(self.labels, "f1"), "precision": EntityF1(self.labels, "precision"),
            "recall": EntityF1(self.labels, "recall"),
            "token_acc": MulticlassAccuracy(len(self.labels), average="micro", ignore_index=IGNORE),
        })

    def update(self, metrics, logits, batch, module):
        for name, metric in metrics.items():
            if name.endswith("token_acc"):
                metric.update(logits.flatten(0, 1), batch["labels"].flatten())
            else:
                metric.update(logits, batch["labels"])

    def predictions(self, logits, batch, module):
        return logits.argmax(-1).masked_fill(batch["labels"] == IGNORE, IGNORE) if "labels" in batch else logits.argmax(-1)
