"""W&B (offline automatically when there are no credentials) and CSV, plus results.json.

W&B as a sweep needs it: a multirun's runs share one group, the sweep (`<task_name>:<sweep folder>`);
`job_type` says train or eval; the summary keeps the best dev value of the selection metric
(`define_metric`, not the last epoch's); and the config is flat, every knob a key named as on the
command line (`method.prefix_length`) plus short names for the ones sweeps compare (`prefix_length`,
`lr`, `backbone`, `trainable_pct`, ...), so grouped runs and parallel coordinates work unedited.
A run or sweep job is one W&B run however often it resumes: results.json records the run id
(`wandb_run_id`) and an attempt in the same folder continues that run (`resume_id`, `keep_best`).
"""
from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def wandb_credentials_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def wandb_offline() -> bool:
    """Offline unless credentials exist; an explicit WANDB_MODE always wins. Never prompts."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    return not wandb_credentials_available()


def sweep_group(task_name: str) -> str:
    """The W&B group: the sweep (`<task_name>:<sweep folder name>`) for a multirun job (also when it
    runs in its own process, multirun.py); `task_name` for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from peft_lightning.multirun import CHILD_ENV

    if not HydraConfig.initialized():
        return task_name
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return f"{task_name}:{Path(str(hc.sweep.dir)).name}"
    if os.environ.get(CHILD_ENV):  # a DDP job of a sweep, run as a single run in <sweep dir>/<job>
        return f"{task_name}:{Path(hc.runtime.output_dir).parent.name}"
    return task_name


def make_wandb_logger(save_dir: str, project: str, name: str | None = None, group: str | None = None,
                      tags: list[str] | None = None, task_name: str = "train", job_type: str | None = None,
                      id: str | None = None, **kwargs):
    """Lightning's WandbLogger; `group` None: the sweep (sweep_group); `job_type` None: train; `id`
    None: a new run (run.py passes the id an earlier attempt in the run's folder recorded)."""
    from lightning.pytorch.loggers import WandbLogger

    offline = wandb_offline()
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
        log.info("W&B: no credentials found, logging offline; upload later with `wandb sync %s/wandb/offline-run-*`",
                 save_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    swept = job_overrides()
    if name and swept:  # runs of one sweep differ by their overrides: say them in the name
        name = f"{name} {','.join(swept)}"
    # resume="allow": online, the run with this id goes on (created if the server never saw it: an
    # attempt that was offline); offline, wandb writes another offline-run-<time>-<id> folder under
    # the same id, and `wandb sync` uploads a run's folders oldest first into that one run
    kwargs.setdefault("resume", "allow")
    return WandbLogger(save_dir=save_dir, project=project, name=name, group=group or sweep_group(task_name),
                       tags=list(tags or []), job_type=job_type or "train", offline=offline, id=id, **kwargs)


def is_wandb(logger_cfg) -> bool:
    """A logger config that builds a W&B logger (ours, or Lightning's WandbLogger named directly)."""
    return str(logger_cfg.get("_target_", "")).endswith(("make_wandb_logger", "WandbLogger"))


def resume_id(results: dict) -> str | None:
    """The W&B run an attempt in this folder continues: the newest `wandb_run_id` that results.json
    (this attempt's, with the earlier ones under `previous_attempts`) recorded; None: none yet."""
    attempts = [*results.get("previous_attempts", []), results]
    return next((a["wandb_run_id"] for a in reversed(attempts) if a.get("wandb_run_id")), None)


def keep_best(logger, metric: str, best: float) -> None:
    """The summary's `val/<metric>` as {"max": best}, the run's best dev value over all its attempts
    (val/<metric>_best, which travels in the checkpoint). define_metric's max is kept by each
    attempt's own wandb process, over the values that process logged: an attempt resumed after the
    best epoch would end the run with a lower "max" (its summary is the run's last)."""
    logger.experiment.summary[f"val/{metric}"] = {"max": best}


def job_type(cfg: DictConfig) -> str:
    """`eval` for a run that trains nothing (trainer.max_epochs / max_steps / limit_train_batches 0), else `train`."""
    trainer = cfg.get("trainer") or {}
    nothing = any(trainer.get(k) == 0 for k in ("max_epochs", "max_steps", "limit_train_batches"))
    return "eval" if nothing else "train"


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], str(node) if isinstance(node, list) else node


def flat_config(cfg: DictConfig, parameters: dict | None = None) -> dict:
    """The run's settings for W&B: every leaf of the config under its dotted key (`method.optim.lr`,
    as on the command line; lists as strings, `[3, 4, 5]`, so they filter and plot), and short keys
    for what sweeps compare: method, backbone, data, seed, lr, weight_decay, warmup_ratio, head,
    batch_size, max_epochs, max_steps (-1: no step budget), every scalar knob of the method
    (prefix_length, reparameterization, depth, r, bottleneck, ...), trainable and trainable_pct."""
    config = OmegaConf.to_container(cfg, resolve=True)
    flat = dict(_leaves({k: v for k, v in config.items() if k != "hydra"}))
    method, data, trainer = config.get("method") or {}, config.get("data") or {}, config.get("trainer") or {}
    short = {"method": method.get("name"), "backbone": (config.get("model") or {}).get("name"),
             "data": data.get("name"), "seed": config.get("seed"), "head": (method.get("head") or {}).get("type"),
             "batch_size": data.get("batch_size"), "max_epochs": trainer.get("max_epochs"),
             "max_steps": trainer.get("max_steps", -1)}
    short.update(method.get("optim") or {})  # lr, weight_decay, warmup_ratio
    short.update({k: str(v) if isinstance(v, list) else v for k, v in method.items()
                  if k != "name" and not isinstance(v, dict)})
    for key in ("trainable", "trainable_pct", "total"):
        if parameters and key in parameters:
            short[key] = parameters[key]
    return {**flat, **short}


def configure_wandb(logger, cfg: DictConfig, parameters: dict, metric: str) -> None:
    """The flat config, and the summary of `val/<metric>` (the selection metric, higher is better:
    selection keeps the maximum, see tasks/base.py) and of `val/loss` as their best values."""
    run = logger.experiment
    run.config.update(flat_config(cfg, parameters), allow_val_change=True)
    # (Lightning's WandbLogger steps every metric by trainer/global_step: keep it for these two)
    run.define_metric(f"val/{metric}", summary="max", step_metric="trainer/global_step")
    run.define_metric("val/loss", summary="min", step_metric="trainer/global_step")


def job_overrides(everything: bool = False) -> list[str]:
    """The command-line overrides of this run or multirun job (without the sweep file's name
    unless `everything`)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    from omegaconf.errors import InterpolationResolutionError

    task = HydraConfig.get().overrides.task
    try:
        overrides = list(task)  # resolved: `a=${b}` is recorded with b's value, as the job ran
    except InterpolationResolutionError:  # `a=${nope}` as typed: the run fails where it reads a, naming a
        overrides = OmegaConf.to_container(task, resolve=False)
    return overrides if everything else [o for o in overrides if not o.lstrip("+").startswith("sweeps=")]


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
