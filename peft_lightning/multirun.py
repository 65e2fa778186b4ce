"""Multiruns: sweeps that survive interruption, and DDP inside a sweep.

Resumable sweeps. Relaunching a multirun with the same `hydra.sweep.dir` finishes it: each job
finds its own folder by its overrides (`job_subdir`, the `hydra.sweep.subdir` resolver; not by
its number, which another launch or Optuna may give to another job), a job whose results.json
says it completed is not run again (train.py returns its recorded objective to the sweeper), and a
job that failed, was interrupted or killed goes on from its `interrupted.ckpt` / `last.ckpt`
through the single-run resume (run.py, faults.py). A seeded Optuna study resumes by replay: the
same seed and the same recorded values make the sampler propose the same trials again.

DDP inside a multirun. Lightning starts DDP ranks 1..N-1 by re-running the command line (`sys.argv`) with
`hydra.run.dir` set. Inside a multirun that command line is the whole sweep (`-m` and every
swept value) and `hydra.run.dir` is not the job's directory: every rank would start the sweep
again, with duplicated jobs, runs in the wrong folders and killed processes.

The fix here: a multirun job that will launch DDP processes runs itself as an ordinary single run
in a child process, with exactly the job's overrides and the job's output directory. Inside
that child Lightning's launcher works as it does for any single run; the child writes the job's
results.json, checkpoints and one W&B run (rank 0), and this process returns the job's selection
metric (`objective`) to the sweeper. SLURM jobs are left alone: there srun starts the ranks, not Lightning.
A user error in that child (a config value, its run folder in use by another launch) is handed back to
this process (`report_to_parent`) and raised here as that job's error: the sweep runs the other jobs and
ends with its one line, exit 2, as for a job run in-process.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
CHILD_ENV = "PEFT_LIGHTNING_MULTIRUN_CHILD"
CHILD_ERROR_ENV = "PEFT_LIGHTNING_CHILD_ERROR"  # where a DDP job's own process leaves its user error
FINISHED = ("completed", "not_trained")  # statuses a relaunch does not run again


# --- resumable sweeps -----------------------------------------------------------------------------
def job_key(overrides) -> tuple[str, ...]:
    """What identifies a job within a sweep: its overrides, in any order; a `ckpt_path` given to
    resume it is not part of what it is."""
    return tuple(sorted(str(o) for o in overrides if not str(o).lstrip("+").startswith("ckpt_path=")))


def recorded_overrides(folder: Path) -> list[str] | None:
    """The overrides a job folder was made for: Hydra's .hydra/overrides.yaml (written before the
    job runs, so also for a job killed at once), else its results.json."""
    file = folder / ".hydra" / "overrides.yaml"
    try:
        if file.is_file():
            return [str(o) for o in OmegaConf.load(file)]
        results = folder / "results.json"
        if results.is_file():
            return list(json.loads(results.read_text()).get("overrides") or [])
    except (OSError, ValueError):  # a half-written or foreign file: not a job of this sweep
        pass
    return None


SRUN_WAIT_S = 600.0


def srun_rank() -> int | None:
    """This process's task number when srun started several tasks for one job (SLURM_PROCID), else
    None. As Lightning decides (SLURMEnvironment.detect): an interactive allocation (job name `bash`
    or `interactive`) is not srun's, Lightning starts the DDP processes there itself."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and SLURMEnvironment.detect():
        return int(os.environ.get("SLURM_PROCID", "0"))
    return None


_SUBDIRS: dict[tuple, str] = {}  # (sweep dir, num, key) -> folder name: the same answer however often asked


def job_subdir(sweep_dir, num, overrides) -> str:
    """`hydra.sweep.subdir` of a multirun job: the folder of an earlier launch's job with the same
    overrides, else `num` when free, else the next free number (that number's folder holds another
    job: a relaunch with other overrides, a renumbered Optuna trial). A folder is claimed by
    creating it, so jobs launched in parallel (joblib, SLURM) never share one."""
    sweep_dir, key = Path(str(sweep_dir)), job_key(overrides)
    memo = (str(sweep_dir), int(num), key)
    if memo in _SUBDIRS:
        return _SUBDIRS[memo]
    rank, waited = srun_rank(), 0.0
    while True:
        folders = [f for f in sweep_dir.iterdir() if f.is_dir()] if sweep_dir.is_dir() else []
        found = [f.name for f in folders if (o := recorded_overrides(f)) is not None and job_key(o) == key]
        # srun's other tasks of this job (DDP ranks on SLURM, each running this same job) take the folder
        # task 0 claims, once its .hydra/overrides.yaml names it: a claim of their own would split the job
        if found or not rank or waited >= SRUN_WAIT_S:
            break
        time.sleep(0.2)
        waited += 0.2
    if rank and not found:
        raise RuntimeError(f"SLURM task {rank}: no job folder with overrides {list(key)} appeared in {sweep_dir} "
                           f"within {SRUN_WAIT_S:.0f} s (task 0 claims it)")
    if found:
        name = min(found, key=lambda n: (len(n), n))
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        taken = [int(f.name) for f in folders if f.name.isdigit()]
        for n in itertools.chain([int(num)], itertools.count(max([int(num), *taken]) + 1)):
            try:
                (sweep_dir / str(n)).mkdir()
            except FileExistsError:
                continue
            name = str(n)
            break
    _SUBDIRS[memo] = name
    return name


def resume_checkpoint(job_dir: Path, results: dict) -> str | None:
    """Where an unfinished job goes on from: the checkpoint its interrupt named (`resume_from`),
    else the newest of checkpoints/interrupted.ckpt and last.ckpt (a killed job names none), else
    nowhere (it starts afresh)."""
    named = results.get("resume_from")
    if named and Path(named).is_file():
        return str(named)
    found = [p for p in (job_dir / "checkpoints" / n for n in ("interrupted.ckpt", "last.ckpt")) if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def finished_job(job_dir) -> dict | None:
    """The results.json of a job folder whose job finished (completed, or had nothing to train)."""
    try:
        results = json.loads((Path(job_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("status") in FINISHED else None


def in_multirun() -> bool:
    """A job of a multirun (not a DDP job's own process, which reports through its exit code)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return not os.environ.get(CHILD_ENV) and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def earlier_launch(cfg: DictConfig) -> dict | None:
    """In a multirun job: this job's results.json from an earlier launch of the sweep, when that
    job finished (the caller skips the job). An unfinished one sets `cfg.ckpt_path` to where it
    goes on from (unless a ckpt_path was given) and returns None: the job runs."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return None
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = json.loads((job_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None  # a new job (or one killed before it wrote anything): run it
    status = results.get("status")
    if status in FINISHED:
        log.info("job %s finished in an earlier launch of this sweep (%s): not run again; %s",
                 HydraConfig.get().job.num, status, job_dir / "results.json")
        return results
    resume = None if cfg.get("ckpt_path") else resume_checkpoint(job_dir, results)
    if resume:
        cfg.ckpt_path = resume
    # "running": killed in an earlier launch, or running now in another process (the run-folder lock
    # refuses this one then, before it writes anything: faults.hold_run_folder)
    was = "recorded as running (killed in an earlier launch, or still running elsewhere)" if status == "running" \
        else f"{status} in an earlier launch of this sweep"
    log.info("job %s was %s: %s", HydraConfig.get().job.num, was,
             f"resuming from {resume}" if resume else "running it again")
    return None


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
    if HydraConfig.get().mode != RunMode.MULTIRUN or srun_rank() is not None:  # srun started the ranks
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


def run_job_in_own_process(script: str, ckpt_path: str | None = None) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    resume = [f"ckpt_path={ckpt_path}"] if ckpt_path and not any(
        o.lstrip("+").startswith("ckpt_path=") for o in hc.overrides.task) else []
    command = [sys.executable, os.path.abspath(script), *hc.overrides.task, *resume,
               f"hydra.run.dir={job_dir}", "hydra.output_subdir=null", "hydra.job.name=job"]
    with tempfile.TemporaryDirectory() as tmp:  # (not in the job folder: a refused child writes nothing there)
        error_file = Path(tmp) / "error.json"
        env = {**os.environ, CHILD_ENV: "1", CHILD_ERROR_ENV: str(error_file)}
        returncode = subprocess.run(command, env=env, cwd=hc.runtime.cwd).returncode
        user_error = json.loads(error_file.read_text()) if returncode != 0 and error_file.is_file() else None
    if user_error:  # the child's own error, not "exited with 2": the sweep ends with its one line
        from peft_lightning import errors

        kind = getattr(errors, user_error["type"], None)
        raise (kind if isinstance(kind, type) and issubclass(kind, errors.UserError) else errors.UserError)(
            user_error["message"])
    results_file = job_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if returncode != 0:
        raise RuntimeError(f"job {hc.job.num} ({' '.join(hc.overrides.task)}) exited with {returncode}; "
                           f"see {job_dir}/job.log and {results_file}")
    return objective(results.get("metrics", {}).get("best", {}))  # the child's run logged one val/*_best


def report_to_parent(err: BaseException) -> None:
    """In a DDP job's own process (run_job_in_own_process): leave the user error for the sweep's process."""
    path = os.environ.get(CHILD_ERROR_ENV)
    if path:
        Path(path).write_text(json.dumps({"type": type(err).__name__, "message": str(err)}))
