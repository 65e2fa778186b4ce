"""Every sweep in sweeps/ composes into a valid multirun, every job's config passes validation
(no unknown keys, no bad values), and no training is done here."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from test_configs import CONF, compose_cfg

from peft_lightning.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml") if p.stem not in ("wandb_sweep", "slurm"))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_composes_with_its_axes(sweep, monkeypatch):
    monkeypatch.setenv("PEFT_LIGHTNING_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"+sweeps={sweep}"], return_hydra_config=True)
    assert cfg.task_name == sweep  # its own outputs/<task_name>/multiruns/ folder
    params = cfg.hydra.sweeper.params
    assert params, "a sweep without axes"
    validate_config(compose_cfg([f"+sweeps={sweep}"]))
    for key, values in params.items():
        override = OverridesParser.create().parse_overrides([f"{key}={values}"])[0]
        if sweep == "optuna":
            assert values.startswith(("tag(", "choice(")), values
            if not isinstance(override.value(), ChoiceSweep):
                continue  # an interval: Optuna draws the values
        for value in override.sweep_string_iterator():  # each value composes into a valid job
            validate_config(compose_cfg([f"+sweeps={sweep}", f"{key}={value}"]))
    if sweep == "optuna":
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"


def test_slurm_launcher_combines_with_a_sweep(monkeypatch):
    """The command in sweeps/slurm.yaml: the sweep keeps its axes, submitit runs the jobs with one
    SLURM task per DDP device."""
    # hydra-submitit-launcher is in the dev extras: without it this fails (no silent skip)
    monkeypatch.setenv("PEFT_LIGHTNING_ROOT", str(ROOT))
    command = next(line for line in (ROOT / "sweeps" / "slurm.yaml").read_text().splitlines() if "train.py" in line)
    overrides = [o.strip("'") for o in command.split("train.py -m ")[1].split()]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == cfg.trainer.devices == 4
    assert cfg.hydra.sweeper.params["method.prefix_length"] == "1,4,8,16,32,64,128"
    assert cfg.task_name == "prefix_length"
    validate_config(compose_cfg(overrides))


def test_wandb_sweep_calls_train_py_with_overrides():
    import yaml

    spec = yaml.safe_load((ROOT / "sweeps" / "wandb_sweep.yaml").read_text())
    assert spec["program"] == "train.py" and "${args_no_hyphens}" in spec["command"]
    assert spec["metric"]["name"] == "val/acc_best"


@pytest.mark.slow  # ~3 minutes on 2 cores: .ci/run runs the slow tests after the default run
def test_prefix_length_sweep_runs_on_the_embedded_default_and_reports(tmp_path):
    """The whole prefix-length sweep (3 methods x 7 lengths) on MiniLM and the embedded data, with
    a tiny budget per job, then the report: a row per job's settings and a plot."""
    import json
    import subprocess
    import sys

    tiny = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1", "data.batch_size=4", "data.eval_batch_size=8", "data.max_length=32",
            "logger=csv", "callbacks=none"]
    proc = subprocess.run([sys.executable, "train.py", "-m", "+sweeps=prefix_length", *tiny,
                           f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")]
    assert len(results) == 21 and all(r["status"] == "completed" for r in results)
    from peft_lightning.report import main

    assert main([str(tmp_path), "--out", str(tmp_path / "report" / "r.md")]) == 0
    text = (tmp_path / "report" / "r.md").read_text()
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + 21  # header + one row per setting
    assert (tmp_path / "report" / "r_best_dev_acc_vs_method_prefix_length.png").stat().st_size > 1000
