"""Sequence-level tasks: one pooled hidden state per text (or per candidate) through the head."""
from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef

from peft_lightning.errors import DataError
from peft_lightning.tasks.base import Task, label_name


class Classification(Task):
    """Single sentences or pairs (`text_pair`), cross-entropy over `labels`."""

    def metrics(self) -> MetricCollection:
        n = len(self.labels)
        return MetricCollection({
            "acc": MulticlassAccuracy(n, average="micro"),
            "f1": MulticlassF1Score(n, average="macro"),
            "mcc": MulticlassMatthewsCorrCoef(n),
        })


class Regression(Task):
    """A number per text or pair (STS-B): a one-output head, mean squared error."""

    metric = "pearson"
    outputs_per_example = 1

    def label_value(self, value, where: str) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: regression label {value!r} is not a number") from None
        if not math.isfinite(number):  # inf makes the loss inf and the metrics NaN, far from the cause
            raise DataError(f"{where}: regression label {value!r} is not a finite number")
        return number

    def logits(self, module, batch):
        return module.head_logits(batch).squeeze(-1)

    def loss(self, logits, batch):
        return nn.functional.mse_loss(logits, batch["labels"].to(logits.dtype))

    def metrics(self) -> MetricCollection:
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef(),
                                 "mse": MeanSquaredError()})

    def update(self, metrics, logits, batch, module):
        metrics.update(logits.float(), batch["labels"].float())

    def predictions(self, logits, batch, module):
        return logits


class MultipleChoice(Task):
    """A context (`text`, optionally + `text_pair`, e.g. COPA's question) and candidate
    continuations (`choices`): each (context, candidate) pair is scored by a one-output head,
    softmax over the candidates. Batches hold (batch, choices, length) tensors."""

    roles = ("text", "choices", "label")
    outputs_per_example = 1

    def tokenize(self, rows, tokenizer, max_length):
        contexts = rows["text"]
        if rows.get("text_pair") is not None:
            contexts = [f"{c} {q}" for c, q in zip(contexts, rows["text_pair"])]
        firsts = [c for c, choices in zip(contexts, rows["choices"]) for _ in choices]
        seconds = [choice for choices in rows["choices"] for choice in choices]
        flat = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
        sizes = [len(choices) for choices in rows["choices"]]
        out, start = {k: [] for k in flat}, 0
        for size in sizes:
            for k in flat:
                out[k].append(flat[k][start:start + size])
            start += size
        out["labels"] = rows["label"]
        return out

    def collator(self, tokenizer):
        pad = super().collator(tokenizer)

        def collate(features):
            choices = len(features[0]["input_ids"])
            if any(len(f["input_ids"]) != choices for f in features):
                raise ValueError("multiple_choice: every example in a batch needs the same number of choices")
            keys = [k for k in features[0] if k != "labels"]
            flat = [{k: f[k][i] for k in keys} for f in features for i in range(choices)]
            batch = {k: v.view(len(features), choices, -1) for k, v in pad(flat).items()}
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features])
            return batch

        return collate

    def logits(self, module, batch):
        b, c = batch["input_ids"].shape[:2]
        flat = {k: v.flatten(0, 1) if v.dim() == 3 else v for k, v in batch.items() if k != "labels"}
        return module.head_logits(flat).view(b, c)

    def label_value(self, value, where):
        text = label_name(value)
        if not text.isdigit():
            raise DataError(f"{where}: multiple-choice label {value!r} must be the index of the right choice")
        if self.labels and int(text) >= len(self.labels):
            raise DataError(f"{where}: choice index {text}, but data.labels names {len(self.labels)} choices")
        return int(text)

    def metrics(self) -> MetricCollection:
        n = max(len(self.labels), 2)
        return MetricCollection({"acc": MulticlassAccuracy(n, average="micro")})
