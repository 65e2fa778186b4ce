"""The shared LightningModule: a frozen backbone, a method's trainable parts, a head.

A method subclasses `PeftClassifier` and implements `build()` (create its trainable modules) and
`encode(batch)` (hidden states of the real tokens). Everything else lives here once: the head,
loss, metrics, optimizer and schedule, and checkpoints that carry only the trainable tensors.
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import get_linear_schedule_with_warmup

from peft_lightning.backbone import BackboneSpec, count_parameters, load_backbone

log = logging.getLogger(__name__)


class ClassificationHead(nn.Module):
    """Randomly initialised linear head on the first token (P-Tuning v2) or the mean of tokens."""

    def __init__(self, hidden: int, num_labels: int, dropout: float, pooling: str = "first"):
        super().__init__()
        if pooling not in ("first", "mean"):
            raise ValueError(f"head.pooling must be 'first' or 'mean', got '{pooling}'")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "first":
            pooled = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return self.linear(self.dropout(pooled))


class PeftClassifier(L.LightningModule):
    def __init__(self, model: dict, method: dict, num_labels: int, labels: list[str] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.method_cfg = dict(method)
        self.backbone = load_backbone(BackboneSpec(**model))
        # The frozen backbone runs in eval mode (no dropout) unless asked: its weights never change,
        # so its dropout only adds noise. `backbone_dropout: true` follows the official P-Tuning v2
        # code, which trains with the backbone's dropout on. Lightning keeps each module's mode.
        self.backbone.train(bool(method.get("backbone_dropout", False)))
        if method.get("activation_checkpointing", False):
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.build()
        # Our head reads the last hidden states, never the backbone's pooler: it stays frozen, or
        # DDP would find trainable parameters without gradients.
        pooler = getattr(self.backbone, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        head = method.get("head", {})
        self.head = ClassificationHead(
            self.backbone.config.hidden_size, num_labels, head.get("dropout", 0.1), head.get("pooling", "first")
        )
        # Lightning loads our checkpoints non-strictly: they hold only the trainable tensors.
        self.strict_loading = False
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_labels, average="micro"),
                "f1": MulticlassF1Score(num_labels, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_acc_best = MaxMetric()

    # --- to implement in a method -------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states of the real tokens, (batch, seq, hidden), aligned with input_ids.
        Methods that change weights in place (fine-tuning, BitFit) keep this; injection methods override it."""
        return self.backbone(**self.backbone_inputs(batch)).last_hidden_state

    # --- shared ---------------------------------------------------------------------------------
    def backbone_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return {k: batch[k] for k in keys if k in batch}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encode(batch), batch["attention_mask"])

    def parameter_counts(self) -> dict[str, float]:
        return count_parameters(self)

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        log.info(
            "parameters: total %s, trainable %s (%.4f%%)",
            f"{counts['total']:,}", f"{counts['trainable']:,}", counts["trainable_pct"],
        )
        for logger in self.loggers:
            logger.log_hyperparams({f"params/{k}": v for k, v in counts.items()})

    def _step(self, batch):
        logits = self(batch)
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        return loss, logits

    def training_step(self, batch, batch_idx):
        loss, _ = self._step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Loss became {loss.item()} at step {self.global_step}; lower method.optim.lr or check the data. "
                "The last good checkpoint is kept."
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss, logits = self._step(batch)
        n = batch["labels"].shape[0]
        self.log("val/loss", loss, sync_dist=True, batch_size=n)
        self.val_metrics.update(logits, batch["labels"])

    def on_validation_epoch_end(self):
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict(values, prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values["val/acc"])
        self.log("val/acc_best", self.val_acc_best.compute() if self.val_acc_best.update_called else 0.0,
                 prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        loss, logits = self._step(batch)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch["labels"].shape[0])
        self.test_metrics.update(logits, batch["labels"])

    def on_test_epoch_end(self):
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def predict_step(self, batch, batch_idx):
        return torch.softmax(self(batch), dim=-1)

    def configure_optimizers(self):
        optim = self.method_cfg.get("optim", {})
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=optim.get("lr", 5e-3), weight_decay=optim.get("weight_decay", 0.0)
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(optim.get("warmup_ratio", 0.0) * total)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints: trainable tensors only ----------------------------------------------------
    def trainable_state_keys(self) -> set[str]:
        keys = {n for n, p in self.named_parameters() if p.requires_grad}
        keys |= {n for n, _ in self.named_buffers() if not n.startswith("backbone.")}
        return keys

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        keep = self.trainable_state_keys()
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # dropout masks come from the global RNG: a resumed run must continue the same stream
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(self.trainable_state_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(
                f"Checkpoint lacks trainable tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                "it was saved by another method or configuration."
            )
        self._resume_rng_state = checkpoint.get("rng_state")

    def on_train_start(self) -> None:
        # restored here, after Lightning's own setup has drawn whatever random numbers it needs
        state = getattr(self, "_resume_rng_state", None)
        if state:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
            self._resume_rng_state = None
