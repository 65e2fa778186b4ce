"""Multi-task prompt training: several tasks' prefixes and heads on one frozen backbone, one run.

    python train.py data=multitask                                  # rotten_tomatoes + sms_spam
    python train.py data=multitask 'data.tasks=[rotten_tomatoes,sms_spam,movie_dialog]' \\
        data.sampling=temperature data.temperature=2

`data.tasks` lists data configs: a name (conf/data/<name>.yaml, as it is), or a mapping
`{name: <config>, <key>: <value>, ...}` that changes keys of it (`{name: sms_spam, train_examples: 500}`)
or, for a name without a file, is a whole data config (source, labels, columns, ...). Each task
is split, deduplicated and tokenized exactly as a single-task run of that config, except that
the run's data.max_length, batch_size, eval_batch_size and num_workers apply to every task (an entry
that sets one, or group_by_length / extra_eval, which are not used here, is refused).

Sampling: each training example is drawn by first drawing its task i with probability
  proportional   p_i = n_i / sum_j n_j                  (as if the training sets were pooled)
  temperature    p_i = n_i^(1/T) / sum_j n_j^(1/T)      (T = data.temperature: 1 is proportional,
                                                          larger T flattens towards uniform)
then the next example of that task's own shuffled order (reshuffled when used up), n_i being
its training examples (after data.train_examples). An epoch is sum_i n_i examples; the order is a
function of (seed, epoch), as single-task runs, so a resumed run finishes like an uninterrupted one.

Training: every row of a batch gets its own task's prefix (the per-row gather serving uses,
`prefix_encoder.prefix_state`), one backbone pass, each task's head on its rows; the loss is
the mean over the batch's rows of their own task's loss. A task absent from a batch takes no
part in it: its prefix and head get no gradient (None), so neither its weights nor its Adam
moments move. Gradient clipping (trainer.gradient_clip_val) clips each task's gradients on its
own: with one global norm a task's large gradients would shrink another task's step.

Evaluation: each task's dev and test sets on their own, each row with its task's prefix, as the
task's adapter alone computes it. Logged per task as val/<task>/<metric> and test/<task>/<metric>;
val/mean, the mean over tasks of each task's selection metric (its data.metric), selects the run's
checkpoint (checkpoints/, last.ckpt to resume). Each task also keeps its own best-dev state (the
epoch of its best val/<task>/<metric>), saved in every checkpoint; after training each task is
tested with, and exported from, its own best state: adapters/<task>/, a plain adapter that
`predict` and `serving.MultiTaskModel` load as they are. results.json lists them under
`adapters` and each task's best epoch under `task_best`.

Supported: classification tasks (one label tensor per mixed batch) with linear heads, and the
deep-prefix methods serving mixes (ptuning_v2, prefix_tuning; depth deep or a layer list). Every
task gets the same method settings. Under DDP a task may be absent from one rank's batch: set
trainer.strategy.find_unused_parameters=true.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchmetrics import MaxMetric

from peft_lightning.backbone import count_parameters, shared_backbones
from peft_lightning.data.datamodule import TaskDataModule
from peft_lightning.errors import ConfigError
from peft_lightning.injection.prefix_encoder import KVPrompt, kv_optimizer_state, prefix_state
from peft_lightning.methods.base import PeftClassifier, check_checkpoint_fits

log = logging.getLogger(__name__)

SAMPLING = ("proportional", "temperature")
MIXABLE = ("ptuning_v2", "prefix_tuning")  # (serving.MIXABLE: what MultiTaskModel loads)
SHARED_DATA_KEYS = ("max_length", "batch_size", "eval_batch_size", "num_workers")  # the run's, not each task's
# data config keys a multi-task run does not read per task: a task entry that sets one is refused
# (its data config file may hold them: those are the file's defaults, replaced without a word)
NOT_PER_TASK = {**{k: f"the run's data.{k} applies to every task; set data.{k}" for k in SHARED_DATA_KEYS},
                "group_by_length": "not used in a multi-task run (training batches mix tasks by data.sampling)",
                "extra_eval": "not used in a multi-task run (each task is tested on its own test split)"}
NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a task name is a metric key part and a folder name


# --- configuration ------------------------------------------------------------------------------
def data_config_dir() -> Path:
    root = os.environ.get("PEFT_LIGHTNING_ROOT") or Path(__file__).resolve().parents[1]
    return Path(root) / "conf" / "data"


def task_configs(data: dict) -> dict[str, dict]:
    """Task name -> its data config (a plain dict), from `data.tasks`."""
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"data.tasks must be a list of data config names (or mappings with a name), got {tasks!r}")
    folder, out = data_config_dir(), {}
    for i, entry in enumerate(tasks):
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"data.tasks[{i}] must be a data config name or a mapping with a name, got {entry!r}")
        name = entry["name"]
        for key in entry:
            if key in NOT_PER_TASK:
                raise ConfigError(f"data.tasks.{name}.{key}: {NOT_PER_TASK[key]}")
        if not NAME.match(name):
            raise ConfigError(f"data.tasks[{i}]: name {name!r} must be letters, digits, _ or - (it names metrics "
                              "and the task's adapter folder)")
        file = folder / f"{name}.yaml"
        base = OmegaConf.to_container(OmegaConf.load(file), resolve=True) if file.is_file() else {}
        if not base and "source" not in entry:
            known = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "multitask")
            raise ConfigError(f"data.tasks[{i}]={name!r}: no data config conf/data/{name}.yaml (known: "
                              f"{', '.join(known)}); a task of your own is a mapping with name, source, labels ...")
        if "tasks" in base:
            raise ConfigError(f"data.tasks[{i}]={name!r} is itself a multi-task config")
        config = OmegaConf.to_container(OmegaConf.merge(base, entry), resolve=True)
        config.update({k: data[k] for k in SHARED_DATA_KEYS if k in data})
        if name in out:
            raise ConfigError(f"data.tasks names {name!r} twice")
        out[name] = config
    if len(out) < 2:
        raise ConfigError(f"data.tasks lists one task ({next(iter(out))}); a single-task run is data={next(iter(out))}")
    return out


def validate(cfg: DictConfig) -> None:
    """The multi-task data config, each task's data config as a single-task run's, and the method."""
    from peft_lightning import validation
    from peft_lightning.schema import check_data

    data = OmegaConf.to_container(cfg.data, resolve=True)
    sampling = data.get("sampling", "proportional")
    if sampling not in SAMPLING:
        raise ConfigError(f"data.sampling must be one of {SAMPLING}, got {sampling!r}")
    temperature = data.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"data.temperature must be a positive number, got {temperature!r}")
    if data.get("metric", "mean") != "mean":
        raise ConfigError(f"data.metric of a multi-task run is 'mean' (the mean of each task's selection metric), "
                          f"got {data.get('metric')!r}; each task's own data.metric selects its adapter")
    validation._validate_data(data, "data")
    m = cfg.method
    if m.name not in MIXABLE or m.get("depth", "deep") == "embedding":
        raise ConfigError(f"data.tasks trains deep prefixes in mixed-task batches: method must be one of {MIXABLE} "
                          f"with method.depth deep or a layer list, got method={m.name} depth={m.get('depth')}")
    if (m.get("head") or {}).get("type", "linear") != "linear":
        raise ConfigError("data.tasks: method.head.type must be linear (serving.MultiTaskModel runs each task's head "
                          "on the shared hidden states)")
    if m.get("cache_frozen_layers") is True:
        raise ConfigError("data.tasks: method.cache_frozen_layers=true is not supported (mixed batches run every "
                          "layer); use auto or false")
    strategy = cfg.trainer.get("strategy")
    if OmegaConf.is_dict(strategy) and "DDP" in str(strategy.get("_target_", "")) \
            and not strategy.get("find_unused_parameters", False):
        raise ConfigError("data.tasks under DDP: set trainer.strategy.find_unused_parameters=true (a task absent from "
                          "a rank's batch leaves its prefix and head without gradient)")
    for name, task in task_configs(data).items():
        where = f"data.tasks.{name}"
        check_data(task, where)
        if task.get("task", "classification") != "classification":
            raise ConfigError(f"{where}: data.task={task.get('task')}; multi-task training takes classification tasks "
                              "(one label tensor per mixed batch)")
        try:  # (its messages name data.<key>)
            validation._validate_task(OmegaConf.create(task))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        validation._validate_source_keys(task)
        validation._validate_data(task, where)


def task_probabilities(sizes: list[int], sampling: str = "proportional", temperature: float = 1.0) -> list[float]:
    """p_i = n_i^(1/T) / sum_j n_j^(1/T); proportional is T = 1."""
    if sampling not in SAMPLING:
        raise ConfigError(f"data.sampling must be one of {SAMPLING}, got {sampling!r}")
    exponent = 1.0 / temperature if sampling == "temperature" else 1.0
    weights = [n ** exponent for n in sizes]
    return [w / sum(weights) for w in weights]


# --- data ---------------------------------------------------------------------------------------
class TaskMixSampler(Sampler[int]):
    """Indices into the tasks' training sets laid end to end (task i from offsets[i]): an epoch of
    sum(sizes) draws, each a task by `probs`, then that task's next example in its own shuffled
    order (a new shuffle when used up); a function of (seed, epoch), skipping what a mid-epoch
    resume has already trained on (`resume`, as EpochSeededSampler)."""

    def __init__(self, sizes: list[int], probs: list[float], seed: int, resume=None):
        self.sizes, self.probs, self.seed, self.resume, self.epoch = sizes, probs, seed, resume, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.sizes)

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        tasks = torch.multinomial(torch.tensor(self.probs, dtype=torch.float64), len(self), replacement=True,
                                  generator=g)
        out = torch.empty(len(self), dtype=torch.long)
        offset = 0
        for i, n in enumerate(self.sizes):
            where = (tasks == i).nonzero().squeeze(1)
            passes = [torch.randperm(n, generator=g) for _ in range(math.ceil(len(where) / n))]
            out[where] = offset + torch.cat(passes or [torch.empty(0, dtype=torch.long)])[:len(where)]
            offset += n
        return out.tolist()

    def __iter__(self):
        skip = self.resume(self.epoch) if self.resume else 0
        return iter(self.order()[skip:])


class _Tagged(Dataset):
    """The tasks' tokenized training sets end to end, each row with its task's index (`task_ids`)."""

    def __init__(self, parts: list):
        self.parts, self.offsets = parts, [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        task = next(i for i in range(len(self.parts)) if index < self.offsets[i + 1])
        return {**self.parts[task][index - self.offsets[task]], "task_ids": task}


class MultiTaskDataModule(TaskDataModule):
    """Mixed-task training batches (TaskMixSampler), each task's own dev and test loaders (a list,
    in task order: Lightning's dataloader_idx is the task's index). Mid-epoch resume as TaskDataModule."""

    def __init__(self, tokenizer, tasks: dict[str, dict], task_objects: dict, sampling: str = "proportional",
                 temperature: float = 1.0, batch_size: int = 32, cache_dir: str | None = None, seed: int = 42,
                 num_workers: int = 0, **_: object):
        L.LightningDataModule.__init__(self)
        self.tokenizer, self.names = tokenizer, list(tasks)
        self.parts = {name: TaskDataModule(tokenizer=tokenizer, cache_dir=cache_dir, seed=seed,
                                           **{**config, "task": task_objects[name]}) for name, config in tasks.items()}
        self.sampling, self.temperature = sampling, float(temperature)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        # (all classification over one tokenizer: one collator pads every task's rows)
        self.collate = self.parts[self.names[0]].collate
        self._resume_point = None
        self.data = None
        self.stats: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        for part in self.parts.values():
            part.trainer = self.trainer  # (DDP: its evaluation loaders shard by rank)
            part.setup(stage)
        train = [self.parts[n].data["train"] for n in self.names]
        self.data = {"train": _Tagged(train)}
        sizes = [len(t) for t in train]
        self.probabilities = task_probabilities(sizes, self.sampling, self.temperature)
        self.stats = {n: self.parts[n].stats for n in self.names}
        self.stats["sampling"] = {"method": self.sampling, **({"temperature": self.temperature}
                                                             if self.sampling == "temperature" else {}),
                                  "probabilities": dict(zip(self.names, self.probabilities))}
        log.info("multi-task sampling (%s): %s", self.sampling,
                 ", ".join(f"{n} {p:.3f} of {s:,}" for n, p, s in zip(self.names, self.probabilities, sizes)))

    def _loader(self, split: str, shuffle: bool):
        if not shuffle:  # one loader per task, in task order
            return [self.parts[n]._loader(split, False) for n in self.names]
        sampler = TaskMixSampler([len(p) for p in self.data["train"].parts], self.probabilities, self.seed,
                                 self._samples_to_skip)
        if self.trainer is not None and self.trainer.overfit_batches:
            # Lightning would swap a shuffling sampler for a sequential one over the dataset, which is the
            # tasks end to end (the first task's rows alone): overfit the first batches of epoch 0's mix
            return DataLoader(Subset(self.data["train"], sampler.order()), batch_size=self.batch_size,
                              collate_fn=self.collate, num_workers=self.num_workers)
        return DataLoader(self.data["train"], batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate,
                          num_workers=self.num_workers)


# --- the module ---------------------------------------------------------------------------------
class MultiTaskPrompts(L.LightningModule):
    """One method module per task (`members`, each the plain single-task module its adapter
    rebuilds), all on one frozen backbone; mixed-task training, per-task evaluation and selection."""

    def __init__(self, model: dict, method: dict, tasks: dict[str, dict]):
        """`tasks`: name -> {"labels": [...], "task": the module's task settings (name, metric)}."""
        super().__init__()
        from peft_lightning.methods import method_class

        self.save_hyperparameters(logger=False)  # (run.py logs the whole config)
        self.method_cfg = dict(method)
        if method.get("cache_frozen_layers") == "auto":  # (mixed batches run every layer)
            method = {**method, "cache_frozen_layers": False}
        cls = method_class(method["name"])
        with shared_backbones():
            self.members = nn.ModuleDict({name: cls(model=model, method=method, num_labels=len(t["labels"]),
                                                    labels=t["labels"], task=t.get("task"))
                                          for name, t in tasks.items()})
        self.names = list(tasks)
        first = self.members[self.names[0]]
        if any(m.backbone is not first.backbone for m in self.members.values()):
            raise RuntimeError("multi-task members were built on different backbones")
        self.strict_loading = False  # (checkpoints hold only the trainable tensors)
        self.val_best = MaxMetric()  # of val/mean
        # each task's best dev state: {"score", "epoch", "state": its trainable tensors}
        self.task_best: dict[str, dict] = {}

    @property
    def backbone(self):
        return self.members[self.names[0]].backbone

    def parameter_counts(self) -> dict[str, float]:
        return count_parameters(self)  # (the shared backbone once)

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        log.info("parameters: total %s, trainable %s (%.4f%%) for %d tasks", f"{counts['total']:,}",
                 f"{counts['trainable']:,}", counts["trainable_pct"], len(self.names))
        for logger in self.loggers:
            logger.log_hyperparams({f"params/{k}": v for k, v in counts.items()})

    # --- mixed-task batches -------------------------------------------------------------------
    def mixed_logits(self, batch: dict) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(task, its rows' indices, their logits) for each task present in `batch`: every row with
        its own task's prefix, one backbone pass, each task's head on its own rows."""
        ids = batch["task_ids"]
        present = ids.unique()  # (sorted)
        members = [self.members[self.names[i]] for i in present.tolist()]
        first = members[0]
        rows = torch.searchsorted(present, ids)  # each row's position among the present tasks
        kv = torch.stack([m.prefix.kv() for m in members])  # (present tasks, S, 2, H, P, D)
        dropout = first.prefix.dropout.p if self.training else 0.0
        hidden = first.run_backbone(batch, prefix=prefix_state(kv[rows], first.prefix.slots, len(ids), dropout))
        out = []
        for j, member in enumerate(members):
            index = (rows == j).nonzero().squeeze(1)
            out.append((self.names[int(present[j])], index, member.head(hidden[index], batch["attention_mask"][index])))
        return out

    def mixed_loss(self, batch: dict) -> torch.Tensor:
        """The mean over the batch's rows of each row's own task's loss."""
        total = 0.0
        for name, index, logits in self.mixed_logits(batch):
            task = self.members[name].task
            total = total + task.loss(logits, {"labels": batch["labels"][index]}) * len(index)
        return total / batch["labels"].shape[0]

    def training_step(self, batch, batch_idx):
        loss = self.mixed_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Loss became {loss.item()} at step {self.global_step}; lower method.optim.lr "
                                     "or check the data. The last good checkpoint is kept.")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Each task's gradients clipped on their own (see the module docstring)."""
        if not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for member in self.members.values():
            params = [p for p in member.parameters() if p.requires_grad and p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    selection_metric = "mean"  # val/mean selects the run's checkpoint (see the module docstring)
    param_groups = PeftClassifier.param_groups  # LoRA+ groups; one group for prompt methods

    def configure_optimizers(self):
        # the members' own recipe (AdamW, warmup and decay, every method.optim knob), run on this
        # module's parameters: every task's tensors in one optimizer
        config = PeftClassifier.configure_optimizers(self)
        for member in self.members.values():
            if isinstance(member.prefix.encoder, KVPrompt):  # (checkpoints keep the table's moments flat)
                kv_optimizer_state(config["optimizer"], member.prefix.encoder.embedding)
        return config

    # --- per-task evaluation: each task's own loader, its own module ----------------------------
    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.members[self.names[dataloader_idx]].validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.members[self.names[dataloader_idx]].test_step(batch, batch_idx)

    def _task_values(self, stage: str) -> tuple[dict, float]:
        """Every task's metrics of `stage` as <stage>/<task>/<metric>, and the mean of the tasks'
        selection metrics."""
        values, selected = {}, []
        for name, member in self.members.items():
            metrics, loss = (member.val_metrics, member.val_loss) if stage == "val" else \
                (member.test_metrics, member.test_loss)
            if not loss.update_called:  # (this task's loader had no batches)
                continue
            own = {**metrics.compute(), f"{stage}/loss": loss.compute()}
            metrics.reset()
            loss.reset()
            values.update({f"{stage}/{name}/{k.split('/', 1)[1]}": v for k, v in own.items()})
            selected.append(own[f"{stage}/{member.task.metric}"])
        return values, torch.stack(selected).mean() if selected else torch.tensor(0.0)

    def on_validation_epoch_end(self):
        values, mean = self._task_values("val")
        self.log_dict({**values, "val/mean": mean}, prog_bar=False, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.val_best.update(mean)
            for name, member in self.members.items():
                key = f"val/{name}/{member.task.metric}"
                if key in values and (name not in self.task_best or values[key] > self.task_best[name]["score"]):
                    state = {k: v.detach().cpu().clone() for k, v in member.trainable_state_dict().items()}
                    self.task_best[name] = {"score": float(values[key]), "epoch": self.current_epoch,
                                            "step": self.global_step, "state": state}
        self.log("val/mean_best", self.val_best.compute() if self.val_best.update_called else 0.0, prog_bar=True,
                 sync_dist=True)

    def on_test_epoch_end(self):
        values, mean = self._task_values("test")
        self.log_dict({**values, "test/mean": mean}, sync_dist=True)

    def reset_validation(self) -> None:
        for member in self.members.values():
            member.reset_validation()
        self.val_best.reset()
        self.task_best = {}

    # --- each task's best state, adapters -----------------------------------------------------
    def use_task_best(self) -> None:
        """Each task's best-dev state into its module (a task never validated keeps its last)."""
        for name, best in self.task_best.items():
            self.members[name].load_state_dict(best["state"], strict=False)

    def task_best_record(self) -> dict:
        """Per task: the epoch and update of its best dev state, the one tested and exported (the run's
        best_checkpoint is the best mean over tasks, which no task is tested from)."""
        return {name: {"epoch": b["epoch"], "step": b.get("step"), f"val/{self.members[name].task.metric}": b["score"]}
                for name, b in self.task_best.items()}

    def save_adapters(self, folder: str | Path) -> dict[str, str]:
        """adapters/<task>/ for every task: plain single-task adapters."""
        from peft_lightning.checkpoint import save_pretrained

        return {name: str(save_pretrained(member, Path(folder) / name)) for name, member in self.members.items()}

    # --- checkpoints: trainable tensors, the best states ----------------------------------------
    def trainable_state_keys(self) -> set[str]:
        return {f"members.{name}.{k}" for name, m in self.members.items() for k in m.trainable_state_keys()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["val_best"] = self.val_best.max_value.detach().cpu() if self.val_best.update_called else None
        checkpoint["task_best"] = self.task_best

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_fits(self, checkpoint)  # (a changed task list: tensors missing or left over)
        self.val_best.reset()
        if checkpoint.get("val_best") is not None:
            self.val_best.update(checkpoint["val_best"].to(self.val_best.max_value.device))
        self.task_best = checkpoint.get("task_best") or {}


def build(cfg: DictConfig, tokenizer):
    """(datamodule, module) of a multi-task config."""
    from peft_lightning.run import task_config

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("name", None)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    configs = task_configs(data)
    tasks = {name: {"labels": list(c.get("labels") or []), "task": task_config(c)} for name, c in configs.items()}
    module = MultiTaskPrompts(model_cfg, method_cfg, tasks)
    datamodule = MultiTaskDataModule(tokenizer, configs, {n: m.task for n, m in module.members.items()},
                                     sampling=data.get("sampling", "proportional"),
                                     temperature=data.get("temperature", 1.0), batch_size=data.get("batch_size", 32),
                                     num_workers=data.get("num_workers", 0), cache_dir=cfg.paths.cache_dir,
                                     seed=cfg.seed)
    return datamodule, module
