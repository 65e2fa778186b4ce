"""Train a PEFT method: `python train.py method=ptuning_v2 model=minilm data=rotten_tomatoes`."""
import os
import secrets
import signal
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# conf/train.yaml adds this folder to Hydra's search path, for sweeps/
os.environ.setdefault("PEFT_LIGHTNING_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

_STARTED = time.strftime("%Y-%m-%d_%H-%M-%S")
# this launch's folder name: its start time and a random id, so two launches in the same second
# never share a folder (resolver `launch_id`, cached: every job of a sweep sees the same one)
_LAUNCH = f"{_STARTED}_{secrets.token_hex(3)}"


def _run_dir(ckpt_path, default: str) -> str:
    """hydra.run.dir: a resume from `<run>/checkpoints/<name>.ckpt` continues in `<run>`."""
    if not ckpt_path:
        return default
    from peft_lightning.faults import run_folder

    run = run_folder(ckpt_path)
    return str(run) if run is not None else default


def _output_subdir(output_dir: str, mode: str = "") -> str | None:
    """hydra.output_subdir: `.hydra`, or `.hydra/attempt-<time>` when the folder already holds a
    run's record (a resume): the original config and overrides are never overwritten. None (no
    record) for a multirun job that finished in an earlier launch: this launch does not run it."""
    from peft_lightning.multirun import finished_job

    taken = os.path.isfile(os.path.join(output_dir, ".hydra", "config.yaml"))
    if taken and "MULTIRUN" in str(mode) and finished_job(output_dir):
        return None
    return f".hydra/attempt-{_STARTED}" if taken else ".hydra"


def _sweep_subdir(num, *, _root_) -> str:
    """hydra.sweep.subdir: the job's folder, found by its overrides (see peft_lightning/multirun.py)."""
    from peft_lightning.multirun import job_subdir

    return job_subdir(_root_.hydra.sweep.dir, num, list(_root_.hydra.overrides.task))


# used by conf/hydra/default.yaml, resolved before main() runs
OmegaConf.register_new_resolver("resume_run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver("attempt_subdir", _output_subdir, replace=True)
OmegaConf.register_new_resolver("launch_id", lambda: _LAUNCH, use_cache=True, replace=True)
OmegaConf.register_new_resolver("sweep_subdir", _sweep_subdir, replace=True)


def user_error_exit(err) -> None:
    """Bad input (config, data, checkpoint, adapter): say what to fix in one line, no traceback."""
    from peft_lightning.errors import ConfigError
    from peft_lightning.multirun import report_to_parent

    print(f"{'config error' if isinstance(err, ConfigError) else 'error'}: {err}", file=sys.stderr)
    report_to_parent(err)  # (a DDP job of a sweep, in its own process: the sweep raises it as the job's error)
    sys.exit(err.exit_code)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from peft_lightning.errors import UserError
    from peft_lightning.multirun import (earlier_launch, in_multirun, needs_own_process, objective,
                                         run_job_in_own_process)

    try:
        from peft_lightning.run import train  # (checks the transformers and Lightning versions: compat.py)
    except UserError as err:
        user_error_exit(err)

    finished = earlier_launch(cfg)  # a relaunched sweep: a finished job is not run again, an unfinished one resumes
    if finished is not None:
        return objective(finished.get("metrics", {}).get("best", {}), cfg.data)
    if needs_own_process(cfg):  # a DDP job inside a multirun: see peft_lightning/multirun.py
        return run_job_in_own_process(__file__, cfg.get("ckpt_path"))

    try:
        summary = train(cfg)
    except UserError as err:  # bad input (config, data, checkpoint, adapter): say what to fix, no traceback
        if in_multirun():  # one job's input: Hydra records it as failed, runs the other jobs, raises it at the end
            raise
        user_error_exit(err)
    except (SIGTERMException, KeyboardInterrupt) as err:  # results.json written (and a checkpoint, in training)
        from peft_lightning.faults import InterruptCheckpoint

        sigint = isinstance(err, KeyboardInterrupt) or InterruptCheckpoint.received == "SIGINT"
        sys.exit(128 + (signal.SIGINT if sigint else signal.SIGTERM))
    # Returned for Hydra sweepers (Optuna): the metric to optimise.
    return objective(summary["metrics"]["best"], cfg.data)


if __name__ == "__main__":
    # Hydra's own errors raised here, not printed over several lines with exit 1: a command line it cannot
    # compose is a config error like any other (one line, exit 2); anything else keeps its traceback
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as err:  # noqa: BLE001
        from peft_lightning.errors import UserError
        from peft_lightning.schema import hydra_error_message

        if isinstance(err, UserError):  # a multirun job's (the first that failed), raised at the sweep's end
            user_error_exit(err)
        message = hydra_error_message(err, sys.argv[1:])
        if message is None:
            raise
        print(f"config error: {message}", file=sys.stderr)
        sys.exit(2)
