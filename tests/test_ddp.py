"""DDP over 2 CPU processes (gloo) with a frozen backbone: no unused-parameter errors, one run."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_two_cpu_processes_one_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "model=tiny-bert", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "debug=limit", "logger=wandb", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and results["metrics"]["test"]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # one W&B run, not one per rank
    # both ranks trained the same number of steps, in one output directory
    assert results["global_step"] == 10
    assert len(list(tmp_path.glob("checkpoints/*.ckpt"))) >= 1


def test_ddp_inside_a_multirun_one_run_per_job(tmp_path):
    """Two multirun jobs, each DDP over 2 CPU processes: each job finishes once, in its own
    directory, with one results.json and one offline W&B run; nothing else is launched."""
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "model=tiny-bert", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", "debug=limit", "logger=wandb", "method.prefix_length=2,4",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == ["0", "1"], jobs  # no duplicated jobs, no stray run directories
    for job, length in (("0", 2), ("1", 4)):
        results = json.loads((tmp_path / job / "results.json").read_text())
        assert results["status"] == "completed" and results["global_step"] == 10
        assert f"method.prefix_length={length}" in results["overrides"]
        assert len(list((tmp_path / job / "wandb").glob("offline-run-*"))) == 1
