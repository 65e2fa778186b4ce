"""Every option of every config group composes, and the entry point validates before loading."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from peft_lightning.validation import ConfigError, validate_config

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "method", "data", "trainer", "logger", "callbacks", "paths", "experiment", "debug"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} resolve
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/peft-lightning-config-test"
        del cfg["hydra"]  # as in @hydra.main, the job config has no hydra node
    return cfg


def validate_here(cfg):
    """validate_config, except that a GPU trainer config on a machine without a CUDA GPU must fail
    with the error that names trainer.accelerator (what a user on this machine gets)."""
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"trainer.accelerator=(gpu|cuda) but no CUDA GPU is visible"):
            validate_config(cfg)
        return False
    validate_config(cfg)
    return True


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and "task: generation" in (CONF / group / f"{option}.yaml").read_text():
        overrides.append("model=gpt2")  # generation needs a decoder (the default backbone is an encoder)
    cfg = compose_cfg(overrides)
    container = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                 for k in cfg if k != "hydra"}
    assert container["method"]["name"] and container["model"]["name"] and container["data"]["name"]
    validate_here(cfg)  # every key of every option is known to the schema


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), f"conf/{g}/ is empty"


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_configs_instantiate(option):
    """Every trainer config composes and validates; the Trainer is built where the hardware it
    asks for exists (trainer=gpu on a CPU machine: the config error is checked, the build skipped)."""
    import hydra

    cfg = compose_cfg([f"trainer={option}"])
    if not validate_here(cfg):
        pytest.skip(f"no CUDA GPU: trainer={option} composes and fails validation naming trainer.accelerator "
                    "as it should here; building the GPU Trainer needs a GPU")
    if cfg.trainer.accelerator not in ("gpu", "cuda"):  # ddp's auto: CPU processes (gloo), as the tests run it
        with open_dict(cfg):
            cfg.trainer.accelerator = "cpu"
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert trainer.precision == str(cfg.trainer.precision)


@pytest.mark.parametrize("override,message", [
    ("method.prefix_length=0", "method.prefix_length must be a positive integer"),
    ("method.prefix_length=2.5", "method.prefix_length must be a positive integer"),
    ("method.optim.lr=-1", "method.optim.lr must be a positive number"),
    ("method.reparameterization=gru", "method.reparameterization must be one of"),
    ("method.depth=shallow", "method.depth must be"),
])
def test_bad_values_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg([override]))


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "train.py", *args], cwd=CONF.parent, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_help_and_cfg_job():
    out = _run("--help")
    assert out.returncode == 0 and "model: " in out.stdout and "minilm" in out.stdout
    out = _run("--cfg", "job", "method.prefix_length=8")
    assert out.returncode == 0
    assert OmegaConf.create(out.stdout).method.prefix_length == 8


@pytest.mark.parametrize("group,known", [("method", "ptuning_v2"), ("model", "minilm"), ("data", "rotten_tomatoes")])
def test_unknown_option_lists_choices(group, known):
    out = _run(f"{group}=nonexistent")
    assert out.returncode == 2
    assert f"config error: {group}=nonexistent: no such {group} config" in out.stderr and known in out.stderr


def test_bad_value_fails_before_loading_a_model():
    out = _run("method.prefix_length=-3", "model=roberta-large")  # no download is attempted
    assert out.returncode != 0
    assert "method.prefix_length must be a positive integer" in out.stderr
