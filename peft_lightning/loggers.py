"""W&B (offline automatically when there are no credentials) and CSV, plus results.json."""
from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path

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


def make_wandb_logger(save_dir: str, project: str, name: str | None = None, group: str | None = None,
                      tags: list[str] | None = None, **kwargs):
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
    return WandbLogger(save_dir=save_dir, project=project, name=name, group=group, tags=list(tags or []),
                       offline=offline, **kwargs)


def job_overrides(everything: bool = False) -> list[str]:
    """The command-line overrides of this run or multirun job (without the sweep file's name
    unless `everything`)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    overrides = list(HydraConfig.get().overrides.task)
    return overrides if everything else [o for o in overrides if not o.lstrip("+").startswith("sweeps=")]


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
