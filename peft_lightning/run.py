"""Training entry: compose data, method, trainer and loggers from a Hydra config and run.

`train.py` at the repository root is a thin Hydra wrapper around `train(cfg)`.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from peft_lightning.backbone import BackboneSpec, check_tokenizer_fits, load_tokenizer
from peft_lightning.checkpoint import save_pretrained
from peft_lightning.data import TaskDataModule
from peft_lightning.errors import ConfigError
from peft_lightning.faults import (INTERRUPTS, AtomicCheckpointIO, ExactResume, InterruptCheckpoint, check_checkpoint,
                                   hold_run_folder, interrupt_on_sigterm, raise_if_sigterm_swallowed, run_folder)
from peft_lightning.loggers import (configure_wandb, is_wandb, job_overrides, job_type, keep_best, resume_id,
                                    write_json_atomic)
from peft_lightning.methods import method_class
from peft_lightning.validation import validate_config

log = logging.getLogger(__name__)
# The frozen backbone stays in eval mode on purpose (see PeftClassifier.__init__).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def _to_python(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


class EpochTimer(Callback):
    """Seconds of training per epoch: all of its training batches, validation excluded. A validation
    in mid-epoch (val_check_interval; the low-data sweeps' budget of steps validates across epoch ends)
    pauses the clock, and the epoch's next batch restarts it: stopping there would drop the epoch's
    remaining batches (a third of each epoch at 1,000 examples, dev every 30 of 32 batches). An epoch
    run in part (cut short by max_steps, or begun mid-way by a resume) counts as its seconds per batch
    times the epoch's batches: a budget of steps ends most runs mid-epoch, and with 300 steps on
    8,452 examples (265 batches) half the record would be a 35-batch stub."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start: float | None = None
        self._elapsed: float | None = None  # this epoch's seconds so far; None between epochs
        self._batches = 0  # training batches this epoch has run in this process

    def on_train_epoch_start(self, trainer, pl_module):
        self._elapsed, self._batches, self._start = 0.0, 0, time.perf_counter()

    def _pause(self):
        if self._start is not None:
            self._elapsed += time.perf_counter() - self._start
            self._start = None

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._pause()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # (here, not at validation end: the checkpoints saved after a validation are not training)
        if self._elapsed is not None and self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module):
        if self._elapsed is not None:
            self._pause()
            total = trainer.num_training_batches
            if 0 < self._batches < total != float("inf"):
                self._elapsed *= total / self._batches
            if self._batches:
                self.seconds.append(self._elapsed)
            self._elapsed = None


class LastValidation(Callback):
    """The update the fit's last dev evaluation saw. Lightning validates at epoch ends or every
    val_check_interval batches, never at max_steps on its own: a step budget that ends mid-epoch
    trains updates that no dev score, and so no selected checkpoint, has seen. Kept in checkpoints
    (a resume knows it too)."""

    def __init__(self):
        self.step: int | None = None

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == "fit":  # (not eval_before_training's validate)
            self.step = trainer.global_step

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state_dict):
        self.step = state_dict.get("step")


class FullEpochs(Callback):
    """The training epochs whose every batch ran (results.json's epochs_completed): at an epoch's last
    batch, that epoch's index + 1. Kept in checkpoints. An index, not a count of epoch ends and not
    Lightning's epoch counters: a resume from the last checkpoint of a fit that max_steps ended mid-epoch
    counts that epoch processed twice (1 full epoch at update 6 of 264), and a resume that changes the
    batches an epoch (limit_train_batches, the data) makes any batches-over-epoch-size count wrong."""

    def __init__(self):
        self.epochs: int | None = None  # None: no epoch's end seen or restored (a checkpoint older than this)
        self._fitting = False

    def setup(self, trainer, pl_module, stage: str):
        # (test(ckpt_path=best) restores callbacks too: the best epoch's count would replace the fit's)
        self._fitting = stage == "fit"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # (before ModelCheckpoint's step checkpoint of this batch: Lightning runs checkpoint callbacks last)
        if trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches:
            self.epochs = trainer.current_epoch + 1

    def on_train_start(self, trainer, pl_module):
        if self.epochs is None and trainer.global_step == 0:
            self.epochs = 0

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict):
        if self._fitting:
            self.epochs = state_dict.get("epochs")


def build(cfg: DictConfig):
    """(datamodule, LightningModule) for a config; no training."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("name", None)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    tokenizer = load_tokenizer(BackboneSpec(**model_cfg))
    if "tasks" in data_cfg:  # several tasks' prompts on one backbone
        from peft_lightning import multitask

        datamodule, module = multitask.build(cfg, tokenizer)
    else:
        labels = list(data_cfg.get("labels") or [])
        module = method_class(method_cfg["name"])(model=model_cfg, method=method_cfg, num_labels=len(labels),
                                                  labels=labels, task=task_config(data_cfg))
        datamodule = TaskDataModule(tokenizer=tokenizer, cache_dir=cfg.paths.cache_dir, seed=cfg.seed,
                                    **{**data_cfg, "task": module.task})
    try:  # another model's tokenizer would index past the embedding table
        name = model_cfg.get("tokenizer") or model_cfg.get("name_or_path")
        check_tokenizer_fits(tokenizer, module.backbone, f"model.tokenizer={name!r}")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return datamodule, module


def instantiate_loggers(cfg: DictConfig, wandb_id: str | None = None) -> list:
    """The loggers of `cfg.logger`; a W&B logger without a job_type gets train or eval (loggers.job_type),
    one without an id `wandb_id` (the run an earlier attempt in this folder started: it goes on)."""
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if c and "_target_" in c:
            extra = {"job_type": job_type(cfg)} if "job_type" in c and c.get("job_type") is None else {}
            if wandb_id and is_wandb(c) and not c.get("id"):
                extra["id"] = wandb_id
            loggers.append(hydra.utils.instantiate(c, **extra))
    return loggers


def task_config(data_cfg: dict) -> dict:
    """The module's task settings from a data config: task type, selection metric, generation options."""
    task = {"name": data_cfg.get("task", "classification")}
    if data_cfg.get("metric"):
        task["metric"] = data_cfg["metric"]
    if task["name"] == "generation":
        task.update(data_cfg.get("generation") or {})
    return task


def evaluate_extra_sets(cfg: DictConfig, trainer, module, datamodule, ckpt_path) -> dict:
    """Test on each of `data.extra_eval` (name -> data settings that replace the run's own, e.g.
    another source or files; its test split is used), logged as test_<name>/<metric>."""
    results = {}
    base = OmegaConf.to_container(cfg.data, resolve=True)
    for name, spec in (base.pop("extra_eval", None) or {}).items():
        spec = dict(spec)
        if spec.get("files") and set(spec["files"]) == {"test"}:  # an evaluation-only file
            spec["files"] = dict.fromkeys(("train", "validation", "test"), spec["files"]["test"])
        extra = TaskDataModule(tokenizer=datamodule.tokenizer, cache_dir=cfg.paths.cache_dir, seed=cfg.seed,
                               **{**base, "train_examples": None, **spec, "task": module.task})
        module.test_prefix = f"test_{name}/"
        try:
            out = trainer.test(module, datamodule=extra, ckpt_path=ckpt_path, weights_only=True)
        finally:
            module.test_prefix = "test/"
        results.update({k: _to_python(v) for k, v in (out[0] if out else {}).items()})
    return results


def train(cfg: DictConfig) -> dict:
    """Fit, test the best-dev checkpoint, export the adapter; results.json is written whatever happens
    (status `running` from the start, so even a SIGKILL leaves a trace)."""
    started, cpu_started = time.time(), time.process_time()
    out_dir = resume_folder(cfg, cfg.get("ckpt_path"))
    out_dir.mkdir(parents=True, exist_ok=True)
    release_folder = hold_run_folder(out_dir) if _rank_zero(None) else (lambda: None)  # before any write
    try:  # released however the run ends, also before its own try (a second train() here is not refused)
        return _train(cfg, out_dir, started, cpu_started)
    finally:
        release_folder()


def _train(cfg: DictConfig, out_dir: Path, started: float, cpu_started: float) -> dict:
    ckpt_path = cfg.get("ckpt_path")
    summary: dict = {"status": "running", "overrides": job_overrides(everything=True), "method": cfg.method.name,
                     "model": cfg.model.name, "data": cfg.data.name, "seed": cfg.seed}
    summary.update(previous_attempts(out_dir))
    trainer = datamodule = module = None
    fit_end = None  # the last checkpoint of a finished fit: a resume from it only tests and exports
    loggers: list = []
    timer, validated, epochs = EpochTimer(), LastValidation(), FullEpochs()
    restore_sigterm = interrupt_on_sigterm()  # until fit installs Lightning's handler, and after
    try:
        if _rank_zero(trainer):
            write_json_atomic(out_dir / "results.json", summary)
        validate_config(cfg)  # before any model is loaded
        if ckpt_path:
            check_checkpoint(ckpt_path)
        L.seed_everything(cfg.seed, workers=True)
        datamodule, module = build(cfg)
        raise_if_sigterm_swallowed()
        loggers = instantiate_loggers(cfg, resume_id(summary))
        callbacks = [hydra.utils.instantiate(c) for c in cfg.get("callbacks", {}).values() if c and "_target_" in c]
        if not loggers:  # the LR monitor refuses to run without a logger
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        callbacks += [timer, validated, epochs, ExactResume(cfg.seed)]
        trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
        )
        summary["parameters"] = module.parameter_counts()
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger":
                if trainer.is_global_zero:
                    configure_wandb(lg, cfg, summary["parameters"], selection_metric(module))
                    # recorded at once: a resume in this folder continues this run (even after a SIGKILL)
                    summary["wandb_run_id"] = lg.experiment.id
                    write_json_atomic(out_dir / "results.json", summary)
            else:
                lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

        if cfg.get("eval_before_training") and not ckpt_path:  # the untrained (zero-shot) baseline
            before = trainer.validate(module, datamodule=datamodule)
            summary["metrics_before_training"] = {k: _to_python(v) for k, v in (before[0] if before else {}).items()}
            module.reset_validation()
        # weights_only: tensors and plain data only, whoever wrote the file (a pickle cannot run code)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if trainer.interrupted:  # Lightning swallowed an interrupt inside a spawned launcher
            raise KeyboardInterrupt
        fit_end = last_checkpoint(trainer) or ckpt_path  # (before test() loads the callbacks' old state)
        if trainer.received_sigterm:  # arrived after the last batch: the fit is complete, stop here
            raise SIGTERMException
        raise_if_sigterm_swallowed()
        fit_metrics = {k: _to_python(v) for k, v in trainer.callback_metrics.items()}
        best_cb = best_checkpoint_callback(trainer)
        best = best_cb.best_model_path if best_cb else ""
        summary["metrics"] = {"best": {k: v for k, v in fit_metrics.items() if k.endswith("_best")},
                              "final": fit_metrics, "test": {}}
        summary.update(best_record(best_cb))
        trained = trainer.global_step > 0
        multitask = hasattr(module, "use_task_best")  # each task tested and exported from its own best-dev state
        # a multi-task run selects each task's state itself (task_best), with or without a checkpoint callback
        selected = module.task_best if multitask else best
        if trained and not selected:
            # nothing selected on dev: no validation ran (limit_val_batches=0, no dev set), no checkpoint
            # callback monitors the dev metric (callbacks=none: Lightning's own checkpoint keeps the last
            # epoch), or the one that does saved nothing (fast_dev_run, every_n_epochs past the last epoch)
            if validated.step is None or multitask:
                why = "no validation ran"
            elif trainer.fast_dev_run:
                why = "fast_dev_run writes no checkpoint"
            elif best_cb is None:
                why = "no checkpoint callback monitors the dev metric"
            else:
                why = f"the checkpoint callback that monitors {best_cb.monitor} saved no checkpoint"
            log.warning("%s, so no checkpoint was selected on dev: %s (selection: last)", why,
                        "nothing is tested or exported" if trainer.fast_dev_run else
                        "the test metrics and the adapter are the last model's")
            summary["selection"] = f"last ({why})"
        if trained and validated.step is not None and validated.step < trainer.global_step:
            gap = trainer.global_step - validated.step
            # (the last model is tested when nothing was selected: then it is the tested one no dev score saw)
            tested = f"the tested and exported checkpoint is from update {validated.step} at the latest" if selected \
                else f"the tested and exported model is the last one (update {trainer.global_step})"
            log.warning("the last %d updates (after update %d of %d) were never validated: no dev score saw them, so "
                        "%s; end training at a validation (trainer.max_steps at an epoch end or where "
                        "trainer.val_check_interval validates: it counts batches, from each epoch's start unless "
                        "trainer.check_val_every_n_epoch=null)", gap, validated.step, trainer.global_step, tested)
            summary["unvalidated_updates"] = gap
        if not trained:  # trainer.max_epochs=0, max_steps=0, limit_train_batches=0: nothing was learned
            log.warning("no training step ran (trainer.max_epochs / max_steps / limit_train_batches): status "
                        "not_trained; the test metrics are the untrained model's and no adapter is written")
        if multitask:
            module.use_task_best()
            summary["task_best"] = module.task_best_record()
            if selected:  # (without a checkpoint callback that monitors val/mean there is no best_checkpoint)
                summary["selection"] = "each task's best dev state (task_best)" + \
                    ("; best_checkpoint is the best val/mean" if best else "")
        if cfg.get("test", True) and not trainer.fast_dev_run:
            results = trainer.test(module, datamodule=datamodule, ckpt_path=None if multitask else best or None,
                                   weights_only=True)
            test_metrics = {k: _to_python(v) for k, v in (results[0] if results else {}).items()}
            test_metrics.update(evaluate_extra_sets(cfg, trainer, module, datamodule, best or None))
            summary["metrics"]["test"] = test_metrics
        if trainer.is_global_zero and not trainer.fast_dev_run and trained:
            # the module holds the best weights after test(ckpt_path=best)
            if multitask:
                summary["adapters"] = module.save_adapters(out_dir / "adapters")
            else:
                summary["adapter"] = str(save_pretrained(module, out_dir / "adapter"))
        raise_if_sigterm_swallowed()
        summary["status"] = "completed" if trained else "not_trained"
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
                final = {**summary["metrics"]["final"], **summary["metrics"]["test"]}
                lg.experiment.summary.update({f"final/{k}": v for k, v in final.items()})
                lg.experiment.summary.update({f"params/{k}": v for k, v in summary["parameters"].items()})
        return summary
    except BaseException as err:
        interrupted = isinstance(err, (*INTERRUPTS, SystemExit))
        summary["status"] = "interrupted" if interrupted else "failed"
        summary["error"] = f"{type(err).__name__}: {err}"
        if interrupted:
            # the checkpoint this interrupt wrote (in training); else last.ckpt of the finished fit
            # (in test or export); else the checkpoint this attempt began from (in setup)
            resume = InterruptCheckpoint.saved or fit_end or ckpt_path
            if resume:
                summary["resume_from"] = resume
        log.error("run %s: %s", summary["status"], summary["error"])
        raise
    finally:
        if trainer is not None:
            summary["epochs_completed"] = full_epochs(trainer)
            summary["global_step"] = trainer.global_step
            summary["world_size"] = trainer.world_size  # DDP processes: devices x num_nodes
            summary["num_nodes"] = trainer.num_nodes
        if getattr(datamodule, "stats", None):  # split sizes, duplicates removed / across splits
            summary["data_stats"] = datamodule.stats
        summary["wall_time_s"] = time.time() - started
        # (CPU seconds of this process, every thread: unlike wall time, not inflated by a paused or shared machine)
        summary["cpu_time_s"] = time.process_time() - cpu_started
        summary["train_seconds_per_epoch"] = timer.seconds
        summary["peak_memory_mb"] = _peak_memory_mb()
        if _rank_zero(trainer):
            write_json_atomic(out_dir / "results.json", summary)
            log.info("results: %s", out_dir / "results.json")
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            best = getattr(module, "val_best", None)  # (updated by a validation or a checkpoint: the run exists)
            if _rank_zero(trainer) and best is not None and best.update_called:
                for lg in loggers:  # max_value, not compute(): no DDP sync on rank 0 alone
                    if type(lg).__name__ == "WandbLogger":
                        keep_best(lg, selection_metric(module), best.max_value.item())

            wandb.finish(exit_code=0 if summary["status"] == "completed" else 1)
        restore_sigterm()


# --- resume: same folder, nothing lost, a pointer to where to go on ------------------------------
def resume_folder(cfg: DictConfig, ckpt_path) -> Path:
    """This run's output folder. A resume from `<run>/checkpoints/<name>.ckpt` continues in `<run>`,
    with its checkpoints, best-model record, logs and results.json. train.py already points Hydra
    there; this covers an explicit `hydra.run.dir` and multirun jobs (their Hydra log and .hydra/
    stay in the folder Hydra made)."""
    out_dir = Path(cfg.paths.output_dir)
    run = run_folder(ckpt_path)
    if run is None:
        return out_dir
    warn_if_settings_differ(cfg, run / ".hydra" / "config.yaml")
    if run != out_dir.resolve():
        log.info("resuming in the run's own folder %s (this attempt's Hydra output: %s)", run, out_dir)
        cfg.paths.output_dir = str(run)
    return run


def warn_if_settings_differ(cfg: DictConfig, original: Path) -> None:
    """A resume with other settings than the run's own (a forgotten override) is another experiment:
    say which keys differ (a longer max_epochs may be meant; a changed model or data rarely is)."""
    if not original.is_file():
        return

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], node

    ignore = ("ckpt_path", "paths.", "callbacks.fault")  # (where the attempt writes; injected faults)
    before = dict(leaves(OmegaConf.to_container(OmegaConf.load(original), resolve=False)))
    now = dict(leaves(OmegaConf.to_container(cfg, resolve=False)))
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys())
               if before.get(k) != now.get(k) and not k.startswith(ignore)]
    if changed:
        log.warning("resuming with settings that differ from the run's own (%s): %s%s", original,
                    "; ".join(changed[:8]), f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")


def previous_attempts(out_dir: Path) -> dict:
    """The results.json already in this folder (an interrupted attempt, before a resume), kept whole
    under `previous_attempts`, oldest first."""
    file = out_dir / "results.json"
    if not file.is_file() or not _rank_zero(None):
        return {}
    text = file.read_bytes().decode(errors="replace")
    try:
        previous = json.loads(text)
    except ValueError:
        previous = None
    if not isinstance(previous, dict):  # (a hand-edited or foreign file: keep its text)
        previous = {"unreadable_results_json": text[:10_000]}
    return {"previous_attempts": [*previous.pop("previous_attempts", []), previous]}


def full_epochs(trainer) -> int:
    """Training epochs whose every batch ran (FullEpochs, when the run has it and it has seen or restored
    an epoch's end); else Lightning's epoch counters: right unless a resume started from the last
    checkpoint of a fit that max_steps ended mid-epoch (that epoch counted processed twice)."""
    counted = next((cb.epochs for cb in trainer.callbacks if isinstance(cb, FullEpochs)), None)
    if counted is not None:
        return counted
    epochs = trainer.fit_loop.epoch_progress.current
    # (max with processed: a resume from a checkpoint written at an epoch's last batch (on_train_batch_end,
    # every_n_train_steps) counts that epoch processed and never counts the next one started; processed
    # batches: that checkpoint has the batch trained but not yet completed, and a finished fit's resume keeps it)
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return max(max(epochs.started, epochs.processed) - (batches < trainer.num_training_batches), 0)


def best_checkpoint_callback(trainer) -> ModelCheckpoint | None:
    """The ModelCheckpoint that selects by the validation metric (not the one that writes last.ckpt, nor
    Lightning's own without callbacks, which keeps the last epoch: neither selects anything)."""
    return next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor), None)


def best_record(best_cb: ModelCheckpoint | None) -> dict:
    """Path, score, epoch and update step of the best checkpoint (read from the file: memory-mapped,
    weights_only). The step is what compares across training-set sizes under a budget of updates (the
    low-data sweeps), where an epoch is 2 batches at one size and 32 at another."""
    if best_cb is None or not best_cb.best_model_path:
        return {"best_checkpoint": ""}
    score = best_cb.best_model_score
    saved = torch.load(best_cb.best_model_path, map_location="cpu", weights_only=True, mmap=True)
    return {"best_checkpoint": best_cb.best_model_path, "best_score": _to_python(score),
            "best_epoch": saved.get("epoch"), "best_step": saved.get("global_step")}


def last_checkpoint(trainer) -> str | None:
    """checkpoints/last.ckpt: written by a ModelCheckpoint with save_last, or by one without a monitor (ours)."""
    savers = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    lasts = [cb.last_model_path for cb in savers] + [cb.best_model_path for cb in savers if not cb.monitor]
    return next((p for p in lasts if p and Path(p).is_file()), None)


def selection_metric(module) -> str:
    """The metric whose best dev value selects the checkpoint: the task's (f1, acc, ...), or for a
    multi-task run the mean over tasks (val/mean)."""
    return module.task.metric if hasattr(module, "task") else module.selection_metric


def _rank_zero(trainer) -> bool:
    if trainer is not None:
        return trainer.is_global_zero
    # before the trainer, Lightning's rank from RANK / LOCAL_RANK / SLURM_PROCID; the main process of another
    # machine started with NODE_RANK (several machines without SLURM) sets none of them, and is not rank 0
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0) == 0


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
