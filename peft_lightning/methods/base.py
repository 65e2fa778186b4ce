"""The shared LightningModule: a frozen backbone, a method's trainable parts, a head.

A method subclasses `PeftClassifier` and implements `build()` (create its trainable modules) and
`encode(batch)` (hidden states of the real tokens). Everything else lives here once: the head,
loss, metrics, optimizer and schedule, and checkpoints that carry only the trainable tensors.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, get_linear_schedule_with_warmup

from peft_lightning.backbone import (BackboneSpec, checkpointing, count_parameters, load_backbone, load_config,
                                     load_tokenizer)
from peft_lightning.errors import ConfigError
from peft_lightning.injection.architectures import ARCHITECTURES
from peft_lightning.injection.modules import LoRA
from peft_lightning.injection.prefix import PREFIX_KWARG, PrefixState
from peft_lightning.schema import check_method_keys_exist
from peft_lightning.tasks import Classification, make_task
from peft_lightning.errors import ConfigError
from peft_lightning.tasks.base import Task
from peft_lightning.tasks.heads import HEAD_TYPES, PoolerHead, Verbalizer

log = logging.getLogger(__name__)


class PeftClassifier(L.LightningModule):
    def __init__(self, model: dict, method: dict, num_labels: int, labels: list[str] | None = None,
                 task: dict | None = None):
        super().__init__()
        check_method_keys_exist(method)  # a misspelt knob must not be silently ignored
        # (not logged by Lightning: run.py logs the whole config, flat for W&B, where these nested
        # dicts would overwrite the flat `method` / `model` keys)
        self.save_hyperparameters(logger=False)
        self.method_cfg = dict(method)
        head = method.get("head", {})
        head_type = head.get("type", "linear")
        if head_type not in HEAD_TYPES:
            raise ValueError(f"method.head.type must be one of {HEAD_TYPES}, got {head_type!r}")
        spec = BackboneSpec(**model)
        config = load_config(spec)  # read once: it decides the task's kind, then builds the model
        arch = ARCHITECTURES.get(config.model_type)
        self.kind = arch.kind if arch else "encoder"
        task = dict(task or {"name": "classification"})
        self.task = make_task(task.pop("name"), labels or [str(i) for i in range(num_labels)], self.kind, **task)
        lm_head = None
        if head_type == "verbalizer":
            if not isinstance(self.task, Classification):
                raise ValueError("method.head.type=verbalizer scores label words: it needs data.task=classification")
            self.backbone, lm_head = self._load_with_lm_head(spec, config)
        elif self.task.needs_lm:
            # generation: the backbone is the whole LM, so every method's hooks see its output head
            self.backbone = load_backbone(spec, AutoModelForSeq2SeqLM if self.kind == "encoder-decoder"
                                          else AutoModelForCausalLM, config)
        else:
            self.backbone = load_backbone(spec, config=config)
        self._tokenizer = None
        self.input_prompt = None  # an InputPrompt, for methods that prepend input-level prompts
        if method.get("activation_checkpointing", False):
            if hasattr(self.backbone, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.train(True)  # Lightning keeps the modes it finds (see train())
        self.build()
        # The backbone's pooler is frozen: the linear head never reads it (DDP would find trainable
        # parameters without gradients), and the official P-Tuning v2 head (pooler) keeps it frozen.
        pooler = getattr(self.backbone, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        if lm_head is not None:
            self.head = self._verbalizer(lm_head, head.get("label_words") or labels, num_labels, model)
        elif head_type == "pooler":
            self.head = self._pooler_head(pooler, head, config.model_type)
        else:
            self.head = self.task.head(self.backbone.config.hidden_size, head, self.kind)
        # Lightning loads our checkpoints non-strictly: they hold only the trainable tensors.
        self.strict_loading = False
        metrics = self.task.metrics()
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.test_prefix = "test/"  # extra evaluation sets log under test_<name>/
        self.val_best = MaxMetric()
        # The evaluation loss as the mean over the whole set, whatever the batches: each batch's
        # mean weighted by its number of loss terms (examples; labelled tokens for token-level
        # losses, where a per-example weight is wrong), summed across DDP ranks once, at compute,
        # like the other metrics (uneven ranks and batches give the single-process value).
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def train(self, mode: bool = True):
        """The frozen backbone runs in eval mode (no dropout) unless asked: its weights never
        change, so its dropout only adds noise. `backbone_dropout: true` follows the official
        P-Tuning v2 code, which trains with the backbone's dropout on. transformers checkpoints a
        layer only while the layer is in training mode, so with activation checkpointing the
        layers themselves (not their dropouts) are marked as training."""
        super().train(mode)
        if mode:
            self.backbone.train(bool(self.method_cfg.get("backbone_dropout", False)))
            if checkpointing(self.backbone):
                for module in self.backbone.modules():
                    if getattr(module, "gradient_checkpointing", False):
                        module.training = True
        return self

    # --- to implement in a method -------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states, (batch, seq, hidden), aligned with input_ids. Methods that change
        weights in place or hook modules keep this; prompt methods pass their prefix or prompt."""
        return self.run_backbone(batch)

    # --- shared ---------------------------------------------------------------------------------
    def backbone_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        inputs = {k: batch[k] for k in keys if k in batch}
        if self.kind == "encoder-decoder":
            # classify from the decoder run over the input shifted right (as BART's classifier);
            # its last real position has read the whole input through cross-attention
            ids, mask = batch["input_ids"], batch["attention_mask"]
            config = self.backbone.config
            if "decoder_input_ids" in batch:  # generation: the target, shifted right
                inputs["decoder_input_ids"] = batch["decoder_input_ids"]
                inputs["decoder_attention_mask"] = batch["decoder_attention_mask"]
                return inputs
            start = torch.full_like(ids[:, :1], config.decoder_start_token_id)
            decoder_mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask[:, :-1]], dim=1)
            shifted = torch.cat([start, ids[:, :-1]], dim=1).masked_fill(decoder_mask == 0, config.pad_token_id)
            inputs["decoder_input_ids"], inputs["decoder_attention_mask"] = shifted, decoder_mask
        return inputs

    def run_backbone(self, batch, prefix: PrefixState | None = None, prompt: torch.Tensor | None = None):
        """The backbone's last hidden states (the LM's logits, for generation) aligned with
        `batch["input_ids"]`, with deep `prefix` keys/values in its attention and/or an
        input-level `prompt` (P, hidden) in front of the real tokens' embeddings. The one place
        every method calls the backbone."""
        inputs = self.backbone_inputs(batch)
        if prefix is not None:
            inputs[PREFIX_KWARG] = prefix
        if prompt is None:
            return self._main_output(self.backbone(**inputs))
        with self.input_prompt.prepended(inputs, prompt) as joined:
            hidden = self._main_output(self.backbone(**joined))
        return self.input_prompt.strip(hidden, prompt.shape[-2])

    def _main_output(self, output) -> torch.Tensor:
        return output.logits if self.task.needs_lm else output.last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task's logits for a batch."""
        return self.task.logits(self, batch)

    def head_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head on the method's hidden states (tasks call this, reshaping around it)."""
        if isinstance(self.head, Verbalizer):
            batch = self.head.with_mask_token(batch)
        return self.head(self.encode(batch), batch["attention_mask"])

    # --- generation -----------------------------------------------------------------------------
    def generation_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Extra `generate` keywords that carry the method (a prefix, a prompt); methods that
        change the backbone's modules need none."""
        return {}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **options) -> torch.Tensor:
        """transformers' `generate` (greedy or beam search, KV cache) with the method applied."""
        extra = self.generation_inputs(input_ids, attention_mask)
        attention_mask = extra.pop("attention_mask", attention_mask)
        model = self.backbone
        if PREFIX_KWARG in extra and "_validate_model_kwargs" not in vars(model):
            # generate() rejects keywords missing from forward's signature, though forward passes
            # them on (**kwargs) down to the attention call, where the prefix is read: let ours by
            def validate(kwargs, _check=type(model)._validate_model_kwargs):
                return _check(model, {k: v for k, v in kwargs.items() if k != PREFIX_KWARG})

            model._validate_model_kwargs = validate
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **extra, **options)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(BackboneSpec(**self.hparams.model))
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    def log_samples(self, samples: list[tuple[str, str]]) -> None:
        """Generated vs reference texts, appended to <log dir>/samples.jsonl (and W&B's log)."""
        import json
        from pathlib import Path

        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stage = "test" if trainer.testing else "val"
        with (folder / "samples.jsonl").open("a") as f:
            for generated, reference in samples:
                f.write(json.dumps({"stage": stage, "epoch": self.current_epoch, "step": self.global_step,
                                    "generated": generated, "reference": reference}) + "\n")
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_text(f"{stage}/samples", columns=["generated", "reference"],
                                data=[list(s) for s in samples], step=self.global_step)

    @staticmethod
    def _load_with_lm_head(spec: BackboneSpec, config):
        """(bare backbone, its frozen LM head) from the backbone's LM-head model."""
        from transformers import AutoModelForMaskedLM

        kind = ARCHITECTURES.get(config.model_type)
        if kind is None or kind.kind == "encoder-decoder":
            raise ValueError(
                f"method.head.type=verbalizer needs an encoder with an MLM head or a decoder with an LM head; "
                f"'{config.model_type}' is not one here. Use head.type=linear."
            )
        lm = load_backbone(spec, AutoModelForMaskedLM if kind.kind == "encoder" else AutoModelForCausalLM, config)
        backbone = lm.base_model
        heads = [m for name, m in lm.named_children() if m is not backbone]
        if len(heads) != 1:
            raise ValueError(f"cannot find the LM head of {type(lm).__name__}: children {[n for n, _ in lm.named_children()]}")
        return backbone, heads[0]

    def _pooler_head(self, pooler, head: dict, model_type: str) -> PoolerHead:
        if not isinstance(pooler, nn.Module):
            raise ConfigError(f"method.head.type=pooler reads the backbone's pooler, and a {model_type!r} backbone "
                              "has none (BERT and RoBERTa do): use method.head.type=linear")
        if type(self.task).head is not Task.head:  # token tagging, generation: not one vector per example
            raise ConfigError(f"method.head.type=pooler pools each example into one vector: it does not fit "
                              f"data.task={type(self.task).__name__}; use method.head.type=linear")
        # A pooler whose dense bias is exactly 0 was never trained: one the checkpoint holds untrained (the
        # embedded MiniLM's) or one it lacks, which transformers initialises with a zero bias (RoBERTa's
        # checkpoints ship no pooler). The head then reads a fixed random projection + tanh, not a pooler trained
        # in pretraining as BERT's is (next-sentence prediction): legal, and what the official P-Tuning v2 code
        # reads on RoBERTa too, but not what the knob's name suggests, so it is said.
        dense = getattr(pooler, "dense", None)
        if isinstance(dense, nn.Linear) and dense.bias is not None and not dense.bias.detach().any():
            log.warning("method.head.type=pooler: this backbone's pooler looks untrained (its dense bias is all "
                        "zeros: untrained in the checkpoint, or absent from it and initialised at random), so the "
                        "head reads a fixed random projection + tanh of the first token; for a pretrained pooler "
                        "use a BERT checkpoint (e.g. bert-base-uncased, bert-large-cased), or method.head.type=linear")
        return PoolerHead(pooler, self.backbone.config.hidden_size, self.task.num_outputs, head.get("dropout", 0.1))

    def _verbalizer(self, lm_head, words, num_labels: int, model: dict) -> Verbalizer:
        words = [str(w) for w in (words or [])]
        if len(words) != num_labels:
            raise ValueError(f"method.head.label_words needs one word per class ({num_labels}), got {words}")
        tokenizer = load_tokenizer(BackboneSpec(**model))
        ids = []
        for word in words:
            # decoders see a label word after a space (BPE tokenizers mark it in the token)
            pieces = tokenizer((" " if self.kind == "decoder" else "") + word, add_special_tokens=False)["input_ids"]
            if not pieces:
                raise ValueError(f"label word {word!r} is empty after tokenization")
            ids.append(pieces[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"label words {words} share their first token; pick words that differ at the start")
        if max(ids) >= self.backbone.get_input_embeddings().weight.shape[0]:
            raise ValueError("label word ids fall outside the backbone's vocabulary: model.tokenizer does not match")
        mask_id = tokenizer.mask_token_id if self.kind == "encoder" else None
        if self.kind == "encoder" and mask_id is None:
            raise ValueError(f"method.head.type=verbalizer on an encoder needs a mask token; {type(tokenizer).__name__} has none")
        return Verbalizer(lm_head, ids, mask_id, shared={id(p) for p in self.backbone.parameters()})

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
        return self.task.loss(logits, batch), logits

    def training_step(self, batch, batch_idx):
        loss, _ = self._step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Loss became {loss.item()} at step {self.global_step}; lower method.optim.lr or check the data. "
                "The last good checkpoint is kept."
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def on_validation_epoch_start(self):
        self._samples_logged = False  # generation logs a few samples per evaluation

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch, batch_idx):
        loss, logits = self._step(batch)
        self.val_loss.update(loss.detach().float(), weight=self.task.loss_terms(batch))
        self.task.update(self.val_metrics, logits, batch, self)

    def on_validation_epoch_end(self):
        # metric states are gathered across DDP ranks here, once per epoch (torchmetrics syncs at
        # compute), so every rank runs the same collectives however many batches it had
        values = {**self.val_metrics.compute(), "val/loss": self.val_loss.compute()}
        self.val_metrics.reset()
        self.val_loss.reset()
        self.log_dict(values, prog_bar=True, sync_dist=True)  # (already equal on every rank; the sync changes nothing)
        main = f"val/{self.task.metric}"
        if not self.trainer.sanity_checking:
            self.val_best.update(values[main])
        self.log(f"{main}_best", self.val_best.compute() if self.val_best.update_called else 0.0,
                 prog_bar=True, sync_dist=True)

    def reset_validation(self) -> None:
        """Forget validations so far (e.g. one before training): the best value, and metric states
        that inference mode made read-only outside it."""
        self.val_metrics.reset()
        self.val_loss.reset()
        self.val_best.reset()

    def test_step(self, batch, batch_idx):
        loss, logits = self._step(batch)
        self.test_loss.update(loss.detach().float(), weight=self.task.loss_terms(batch))
        self.task.update(self.test_metrics, logits, batch, self)

    def on_test_epoch_end(self):
        values = {**self.test_metrics.compute(), "test/loss": self.test_loss.compute()}
        self.log_dict({self.test_prefix + k.removeprefix("test/"): v for k, v in values.items()}, sync_dist=True)
        self.test_metrics.reset()
        self.test_loss.reset()

    def predict_step(self, batch, batch_idx):
        return self.task.predictions(self(batch), batch, self)

    def param_groups(self, lr: float, ratio: float) -> list[dict]:
        """The trainable parameters; with LoRA+ (ratio != 1, Hayou et al., 2024) LoRA's B matrices
        in a second group at lr x ratio. One group otherwise, as checkpoints without LoRA+ hold."""
        params = [p for p in self.parameters() if p.requires_grad]
        if ratio == 1:
            return [{"params": params}]
        fast = {id(m.B) for m in self.modules() if isinstance(m, LoRA)}
        if not fast:
            raise ConfigError(f"method.optim.lr_ratio={ratio} sets the learning rate of LoRA's B matrices, and "
                              f"method={self.method_cfg.get('name')} has none; leave it at 1")
        return [{"params": [p for p in params if id(p) not in fast]},
                {"params": [p for p in params if id(p) in fast], "lr": lr * ratio}]

    def configure_optimizers(self):
        optim = self.method_cfg.get("optim", {})
        lr = optim.get("lr", 5e-3)
        optimizer = torch.optim.AdamW(self.param_groups(lr, float(optim.get("lr_ratio", 1))), lr=lr,
                                      weight_decay=optim.get("weight_decay", 0.0))
        total = int(self.trainer.estimated_stepping_batches)
        # warmup_steps (a count, as Prefix-Tuning's code gives it) wins over warmup_ratio (a share of training)
        steps = optim.get("warmup_steps")
        warmup = min(int(steps), total) if steps is not None else int(optim.get("warmup_ratio", 0.0) * total)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints: trainable tensors only ----------------------------------------------------
    def trainable_state_keys(self) -> set[str]:
        keys = {n for n, p in self.named_parameters() if p.requires_grad}
        # the method's own persistent buffers (a non-persistent one, such as the verbalizer's label-word
        # ids, is rebuilt from the config and is in no state dict, adapter or checkpoint). Parameters are told
        # apart by identity, not name: a module shared under a second name (the pooler head's backbone pooler,
        # head.pooler.*) lists its frozen weights again in the state dict, under a name named_parameters skips
        params = {id(p) for p in self.parameters()}
        keys |= {n for n, t in self.state_dict(keep_vars=True).items()
                 if not n.startswith("backbone.") and id(t) not in params}
        return keys

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        keep = self.trainable_state_keys()
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, method config) of the adapter to save; a method may simplify both."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        return tensors, dict(self.hparams.method)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # the best validation value so far (val/<metric>_best): metric states are not in state_dict,
        # and a resumed run must compare its next validations with the epochs before the interrupt
        checkpoint["val_best"] = self.val_best.max_value.detach().cpu() if self.val_best.update_called else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint)
        self.val_best.reset()
        if checkpoint.get("val_best") is not None:
            self.val_best.update(checkpoint["val_best"].to(self.val_best.max_value.device))


def check_checkpoint_fits(module, checkpoint: dict[str, Any]) -> None:
    """A checkpoint to resume (or test) from must be this run's kind: every trainable tensor, each of
    its shape, nothing more, and an optimizer with as many parameter groups, at the run's learning rates and
    weight decay (the checkpoint's would win on load). Otherwise it was written
    with another method, settings or task list: a CheckpointError (one line, exit 2) before Lightning
    loads it, not a KeyError / size-mismatch / optimizer traceback, nor a silent partial load."""
    from peft_lightning.errors import CheckpointError

    path = getattr(module._trainer, "ckpt_path", None) if module._trainer is not None else None
    where = f"checkpoint {path}" if path else "checkpoint"
    saved, keys = checkpoint["state_dict"], module.trainable_state_keys()
    for problem, names in (("lacks trainable tensors", sorted(keys - set(saved))),
                           ("holds tensors this run does not train", sorted(set(saved) - keys))):
        if names:
            raise CheckpointError(f"{where} {problem} {names[:5]}{' ...' if len(names) > 5 else ''}: it was saved by "
                                  "another method or configuration; resume with the run's own settings")
    own = module.state_dict()  # (a key/value prefix table in the flat layout checkpoints hold)
    for k in sorted(keys):
        if saved[k].shape != own[k].shape:
            raise CheckpointError(f"{where}: tensor {k} has shape {saved[k].shape}, this run's settings build "
                                  f"{own[k].shape}; resume with the run's own settings")
    optimizers = checkpoint.get("optimizer_states") or []
    if optimizers:
        optim = module.method_cfg.get("optim", {})
        lr, ratio = optim.get("lr", 5e-3), float(optim.get("lr_ratio", 1))
        wanted = module.param_groups(lr, ratio)
        groups, had = len(wanted), len(optimizers[0].get("param_groups", []))
        if had != groups:
            raise CheckpointError(f"{where}: its optimizer has {had} parameter group(s), this run {groups}: "
                                  "method.optim.lr_ratio differs from the run's (LoRA+, a ratio other than 1, gives "
                                  "LoRA's B matrices a group of their own); resume with the run's own lr_ratio")
        # torch's load_state_dict restores each group's hyperparameters with its moments, so the checkpoint's
        # learning rates (the schedule's initial_lr) and weight decay win on load: another method.optim.lr,
        # lr_ratio or weight_decay would be recorded in this run's config and results while the tensors went on
        # training at the checkpoint's. Refused, like the group count above (16 -> 8 keeps LoRA+'s two groups)
        decay = float(optim.get("weight_decay", 0.0))
        for i, (mine, theirs) in enumerate(zip(wanted, optimizers[0]["param_groups"])):
            whose = "LoRA's B matrices (LoRA+)" if i else "its parameters"
            for knob, want, kept in (("learning rate", mine.get("lr", lr), theirs.get("initial_lr")),
                                     ("weight decay", decay, theirs.get("weight_decay"))):
                kept = None if kept is None else float(kept)  # (a tensor where torch's capturable lr is one)
                if kept is not None and not math.isclose(kept, float(want), rel_tol=1e-6, abs_tol=1e-12):
                    raise CheckpointError(
                        f"{where}: its optimizer trained {whose} at {knob} {kept:g}, this run's settings give "
                        f"{want:g} (method.optim.lr={lr:g}, lr_ratio={ratio:g}, weight_decay={decay:g}); the "
                        "checkpoint's would win on load: resume with the run's own method.optim settings")
