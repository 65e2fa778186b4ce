"""What every task type provides; the defaults are single-label classification's."""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MetricCollection
from transformers import DataCollatorWithPadding

from peft_lightning.errors import ConfigError, DataError
from peft_lightning.tasks.heads import ClassificationHead

LOWER_IS_BETTER = ("mse",)


def label_name(value) -> str:
    """A label as the name it is matched by: its text, an integral number without ".0"
    (data.labels=[1, 2] in a yaml are the names "1" and "2"; a parquet float 1.0 reads as "1")."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _integer(text: str) -> bool:
    return text.lstrip("-").isdigit()


class Task:
    """One task type. Rows reach it with role-named columns (`roles`: text, text_pair, label,
    choices, tokens, target), already read and validated by the datamodule."""

    roles: tuple[str, ...] = ("text", "label")  # required columns
    optional_roles: tuple[str, ...] = ("text_pair",)
    metric = "acc"  # the main metric: checkpoint selection, val/<metric>_best
    needs_lm = False  # the backbone is loaded with its LM head (generation)
    outputs_per_example: int | None = None  # head width; None: one per label

    def __init__(self, labels: list[str], kind: str = "encoder", metric: str | None = None, **options):
        if options:
            raise ConfigError(f"{type(self).__name__} takes no options, got {sorted(options)}")
        self.labels, self.kind = [label_name(x) for x in labels], kind
        if metric:  # choose the checkpoint-selection metric among the task's own (data.metric)
            known = list(self.metrics().keys())
            if metric not in known:
                raise ConfigError(f"data.metric={metric!r} is not a metric of {type(self).__name__}: choose from {known}")
            if metric in LOWER_IS_BETTER:  # checkpoints and val/<metric>_best keep the maximum
                raise ConfigError(f"data.metric={metric!r} is better when lower, but selection keeps the highest: "
                                 f"choose from {[m for m in known if m not in LOWER_IS_BETTER]}")
            self.metric = metric

    @property
    def num_outputs(self) -> int:
        return self.outputs_per_example or len(self.labels)

    # --- data ---------------------------------------------------------------------------------
    def label_value(self, value, where: str):
        """A raw label as the index into `labels`; `where` names file/column/row. The rule:
        data.labels are the label names in index order, compared as strings (`label_name`); a
        value that is no name is read as an index 0..n-1, unless a name is itself an integer
        (data.labels=[1, 2]): then the value "1" could mean either, so values must be names."""
        text = label_name(value)
        if text in self.labels:
            return self.labels.index(text)
        numeric_names = any(_integer(x) for x in self.labels)
        if _integer(text) and not numeric_names and 0 <= int(text) < len(self.labels):
            return int(text)
        rule = ("the names are numbers, so a value must be one of them, never an index" if numeric_names
                else f"a value is one of these names or an index 0..{len(self.labels) - 1}")
        raise DataError(f"{where}: label {text!r} is not in data.labels {self.labels} "
                        f"(data.labels: the label names in index order; {rule})")

    def tokenize(self, rows: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
        pair = rows.get("text_pair")
        enc = tokenizer(rows["text"], pair, truncation=True, max_length=max_length)
        enc["labels"] = rows["label"]
        return enc

    def collator(self, tokenizer):
        return DataCollatorWithPadding(tokenizer)

    # --- model --------------------------------------------------------------------------------
    def head(self, hidden: int, head_cfg: dict, kind: str) -> nn.Module | None:
        """The linear head on the backbone (`kind`: encoder | decoder | encoder-decoder)."""
        pooling = head_cfg.get("pooling", "auto")
        if pooling == "auto":
            pooling = "first" if kind == "encoder" else "last"
        return ClassificationHead(hidden, self.num_outputs, head_cfg.get("dropout", 0.1), pooling)

    def logits(self, module, batch: dict) -> torch.Tensor:
        """The head's output for a batch; `module` is the method's LightningModule."""
        return module.head_logits(batch)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, batch["labels"])

    def loss_terms(self, batch: dict) -> int:
        """How many terms `loss` averages over (examples here, labelled tokens for token-level
        losses): the weight that makes batch means combine into the mean over a whole set."""
        return batch["labels"].shape[0]

    def metrics(self) -> MetricCollection:
        raise NotImplementedError

    def update(self, metrics: MetricCollection, logits: torch.Tensor, batch: dict, module) -> None:
        metrics.update(logits, batch["labels"])

    def predictions(self, logits: torch.Tensor, batch: dict, module):
        return torch.softmax(logits, dim=-1)
