"""Beyond one machine: DDP over several nodes as SLURM starts it, the SLURM launcher's shape, and the
sharded strategies we refuse."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from peft_lightning.errors import ConfigError
from peft_lightning.validation import validate_config
from test_configs import compose_cfg
from test_wandb import read_offline_run

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_as_slurm_starts_them_train_one_run(tmp_path):
    """Two processes, each what `srun` starts on one node of a 2-node allocation (SLURM_PROCID,
    SLURM_NODEID, one task per node), with trainer.num_nodes=2: Lightning joins them into one DDP job
    of world size 2 over gloo; the job writes one results.json and one W&B run (global rank 0), with
    half the steps of one process (each rank sees half the batches)."""
    port = _free_port()
    args = [sys.executable, "train.py", "model=tiny-bert", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=1", "data.train_examples=64",
            "data.batch_size=8", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
            "logger=wandb", f"hydra.run.dir={tmp_path}"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "NODE_RANK"))}
    procs = []
    for rank in (0, 1):
        env = {**base, "HF_HUB_OFFLINE": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "peft", "SLURM_NTASKS": "2",
               "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
               "SLURM_NODEID": str(rank), "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and results["metrics"]["test"]
    assert results["global_step"] == 4  # 64 examples / batch 8 / world size 2
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # rank 1 logs nothing
    run = read_offline_run(tmp_path)  # the one run: the job's group, id and settings, finished
    assert (run["group"], run["id"], run["exit_code"]) == ("train", results["wandb_run_id"], 0)
    assert (run["config"]["trainer.num_nodes"], run["config"]["trainer.devices"]) == (2, 1)
    assert (results["world_size"], results["num_nodes"]) == (2, 2)


def test_slurm_launcher_asks_for_the_trainers_nodes(monkeypatch):
    """sweeps/slurm.yaml with trainer.num_nodes=2: submitit asks for 2 nodes with one task per device
    on each, which is the layout Lightning's SLURM environment checks (SLURM_NTASKS = devices x nodes)."""
    monkeypatch.setenv("PEFT_LIGHTNING_ROOT", str(ROOT))
    overrides = ["+sweeps=[prefix_length,slurm]", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.nodes == 2 and launcher.tasks_per_node == launcher.gpus_per_node == 4
    validate_config(compose_cfg(overrides))


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed", "deepspeed_stage_3", "fsdp_cpu_offload",
                                      "{_target_: lightning.pytorch.strategies.FSDPStrategy}",
                                      "{_target_: lightning.pytorch.strategies.DeepSpeedStrategy, stage: 2}",
                                      "deepspeed_stage_2_offload", "FSDP",
                                      "{_target_: lightning.pytorch.strategies.ModelParallelStrategy}"])
def test_sharded_strategies_are_refused_by_name(strategy):
    with pytest.raises(ConfigError, match=r"trainer.strategy=.*(FSDP|fsdp|DeepSpeed|deepspeed|ModelParallel).* is not supported"):
        validate_config(compose_cfg(["trainer=ddp", "~trainer.strategy", f"+trainer.strategy={strategy}"]))


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "auto"])
def test_replicated_strategies_pass(strategy):
    validate_config(compose_cfg(["trainer=ddp", f"trainer.strategy={strategy}"]))


def test_sharded_strategy_exits_2_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "model=tiny-bert", "+trainer.strategy=fsdp",
                          f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "trainer.strategy=fsdp is not supported" in run.stderr.strip().splitlines()[-1]


def _as_srun_task(monkeypatch, procid: int, job_name: str = "peft"):
    for key, value in {"SLURM_NTASKS": "2", "SLURM_PROCID": str(procid), "SLURM_JOB_NAME": job_name}.items():
        monkeypatch.setenv(key, value)


def test_srun_tasks_of_one_sweep_job_share_task_0s_folder(tmp_path, monkeypatch):
    """On SLURM every task srun starts for a sweep job (a DDP rank) resolves the job's folder itself.
    Task 0 claims one; task 1 must take that folder, found by its overrides once Hydra has written them,
    not claim the next free number (which split one job over two folders)."""
    import threading
    import time

    from peft_lightning import multirun

    _as_srun_task(monkeypatch, 1)

    def task_0():  # claims folder 0; Hydra writes the job's overrides a moment later
        time.sleep(0.6)
        (tmp_path / "0" / ".hydra").mkdir(parents=True)
        (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- method.prefix_length=4\n")

    writer = threading.Thread(target=task_0)
    writer.start()
    assert multirun.job_subdir(tmp_path, 0, ["method.prefix_length=4"]) == "0"
    writer.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0"]
    monkeypatch.setattr(multirun, "SRUN_WAIT_S", 0.4)  # task 0 never shows up: a clear error, no claim
    with pytest.raises(RuntimeError, match="SLURM task 1: no job folder with overrides"):
        multirun.job_subdir(tmp_path, 1, ["method.prefix_length=8"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0"]


def test_srun_task_0_claims_and_an_interactive_allocation_is_not_srun(tmp_path, monkeypatch):
    from peft_lightning import multirun

    _as_srun_task(monkeypatch, 0)
    assert multirun.srun_rank() == 0
    assert multirun.job_subdir(tmp_path, 0, ["seed=1"]) == "0"
    # `srun --pty bash`: Lightning starts the DDP processes itself, so a multirun job must run in its own
    # process as off SLURM (else rank 1 re-runs the whole sweep)
    _as_srun_task(monkeypatch, 1, job_name="interactive")
    assert multirun.srun_rank() is None
    assert multirun.job_subdir(tmp_path, 1, ["seed=2"]) == "1"
