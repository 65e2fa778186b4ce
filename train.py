"""Train a PEFT method: `python train.py method=ptuning_v2 model=minilm data=rotten_tomatoes`."""
import os
import signal
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# conf/train.yaml adds this folder to Hydra's search path, for sweeps/
os.environ.setdefault("PEFT_LIGHTNING_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from peft_lightning.multirun import needs_own_process, objective, run_job_in_own_process
    from peft_lightning.run import train
    from peft_lightning.errors import ConfigError, UserError

    if needs_own_process(cfg):  # a DDP job inside a multirun: see peft_lightning/multirun.py
        return run_job_in_own_process(__file__)

    try:
        summary = train(cfg)
    except UserError as err:  # bad input (config, data, checkpoint, adapter): say what to fix, no traceback
        print(f"{'config error' if isinstance(err, ConfigError) else 'error'}: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except SIGTERMException:  # checkpoint saved and results.json written: exit without a traceback
        from peft_lightning.faults import InterruptCheckpoint

        sys.exit(128 + (signal.SIGINT if InterruptCheckpoint.received == "SIGINT" else signal.SIGTERM))
    # Returned for Hydra sweepers (Optuna): the metric to optimise.
    return objective(summary["metrics"]["best"], cfg.data)


if __name__ == "__main__":
    main()
