"""DDP inside a Hydra multirun.

Lightning starts DDP ranks 1..N-1 by re-running the command line (`sys.argv`) with
`hydra.run.dir` set. Inside a multirun that command line is the whole sweep (`-m` and every
swept value) and `hydra.run.dir` is not the job's directory: every rank would start the sweep
again, with duplicated jobs, runs in the wrong folders and killed processes.

The fix here: a multirun job that will launch DDP processes runs itself as an ordinary single run
in a child process, with exactly the job's overrides and the job's output directory. Inside
that child Lightning's launcher works as it does for any single run; the child writes the job's
results.json, checkpoints and one W&B run (rank 0), and this process returns the job's selection
metric (`objective`) to the sweeper. SLURM jobs are left alone: there srun starts the ranks, not Lightning.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

CHILD_ENV = "PEFT_LIGHTNING_MULTIRUN_CHILD"


def _devices(cfg: DictConfig) -> int:
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    if devices == "auto" or devices == -1:
        import torch

        return torch.cuda.device_count() if cfg.trainer.get("accelerator") in ("gpu", "cuda", "auto") else 1
    return len(devices)  # a list of device indices


def needs_own_process(cfg: DictConfig) -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if os.environ.get(CHILD_ENV) or not HydraConfig.initialized():
        return False
    if HydraConfig.get().mode != RunMode.MULTIRUN or os.environ.get("SLURM_NTASKS", "1") != "1":
        return False
    strategy = cfg.trainer.get("strategy")
    spawned = isinstance(strategy, str) and "spawn" in strategy  # spawn re-runs no command line
    return _devices(cfg) > 1 and not spawned


def objective(best: dict, data: DictConfig | dict | None = None) -> float | None:
    """What train.py returns to a sweeper (Optuna maximises it): the best dev value of the run's
    selection metric, `val/<data.metric>_best` (f1, pearson, bleu, ...; the task's default metric
    when data.metric is unset). Without `data` (a job run in a child process, read back from its
    results.json), the one `val/*_best` the run logged, which is that same metric."""
    if data is not None:
        from peft_lightning.tasks import TASKS

        metric = data.get("metric") or TASKS[data.get("task", "classification")].metric
        return best.get(f"val/{metric}_best")
    selected = [k for k in best if k.startswith("val/") and k.endswith("_best")]
    if len(selected) > 1:
        raise RuntimeError(f"results.json has several selection metrics {selected}; pass the job's data config")
    return best[selected[0]] if selected else None


def run_job_in_own_process(script: str) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    command = [sys.executable, os.path.abspath(script), *hc.overrides.task,
               f"hydra.run.dir={job_dir}", "hydra.output_subdir=null", "hydra.job.name=job"]
    env = {**os.environ, CHILD_ENV: "1"}
    returncode = subprocess.run(command, env=env, cwd=hc.runtime.cwd).returncode
    results_file = job_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if returncode != 0:
        raise RuntimeError(f"job {hc.job.num} ({' '.join(hc.overrides.task)}) exited with {returncode}; "
                           f"see {job_dir}/job.log and {results_file}")
    return objective(results.get("metrics", {}).get("best", {}))  # the child's run logged one val/*_best
