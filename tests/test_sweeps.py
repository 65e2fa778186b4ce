"""Every sweep in sweeps/ composes into a valid multirun (no training here)."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from test_configs import CONF

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
    for key, values in params.items():
        if sweep == "optuna":
            assert values.startswith(("tag(", "choice(")), values
            continue
        override = OverridesParser.create().parse_overrides([f"{key}={values}"])[0]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # each value composes
            for value in override.sweep_string_iterator():
                compose("train", overrides=[f"+sweeps={sweep}", f"{key}={value}"])
    if sweep == "optuna":
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"


def test_wandb_sweep_calls_train_py_with_overrides():
    import yaml

    spec = yaml.safe_load((ROOT / "sweeps" / "wandb_sweep.yaml").read_text())
    assert spec["program"] == "train.py" and "${args_no_hyphens}" in spec["command"]
    assert spec["metric"]["name"] == "val/acc_best"
