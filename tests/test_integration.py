"""End to end on the real embedded backbone (all-MiniLM-L6-v2) and the embedded Rotten Tomatoes data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_configs import compose_cfg

from peft_lightning.checkpoint import load_pretrained
from peft_lightning.run import train

pytestmark = pytest.mark.integration


def test_ptuning_v2_learns_on_real_data(tmp_path):
    cfg = compose_cfg([
        "trainer.max_epochs=1", "+trainer.limit_train_batches=120", "+trainer.limit_val_batches=8",
        "+trainer.limit_test_batches=8", "data.batch_size=16", "logger=wandb", "callbacks=default",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ])
    cfg.paths.output_dir = str(tmp_path / "run")
    summary = train(cfg)

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["parameters"]["trainable"] == 16 * 2 * 6 * 384 + 384 * 2 + 2  # P x 2 x layers x hidden + head
    # the job's cost: CPU seconds of this process, at least the training epochs' own wall time at one
    # thread's worth (an epoch keeps a core busy), and never more than every core for the whole run
    cores = torch.get_num_threads()
    assert sum(results["train_seconds_per_epoch"]) * 0.5 < results["cpu_time_s"] <= results["wall_time_s"] * (cores + 1)
    # 120 steps reach test 0.707, dev 0.713 (512 examples each; torch 2.13 CPU, transformers 5.24):
    # the bars sit just below (chance is 0.5); the full default run is the slow test below
    assert results["metrics"]["test"]["test/acc"] >= 0.68, results["metrics"]
    assert results["metrics"]["best"]["val/acc_best"] >= 0.68, results["metrics"]
    # loss falls: first logged training losses vs last (CSV log)
    rows = (tmp_path / "run" / "csv").glob("version_*/metrics.csv")
    import csv

    losses = [float(r["train/loss"]) for f in rows for r in csv.DictReader(f.open()) if r.get("train/loss")]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    # exactly one offline W&B run, finished
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1
    # the exported adapter reproduces the model on a freshly loaded backbone
    module = load_pretrained(summary["adapter"])
    assert module.parameter_counts()["trainable"] == results["parameters"]["trainable"]
    batch = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 6919, 102]]),
             "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with torch.no_grad():
        probs = torch.softmax(module(batch), -1)  # "this movie was wonderful"
    assert probs[0, 1] > 0.5


@pytest.mark.slow  # the README's `python train.py`, ~6 minutes on 2 cores: .ci/run runs it after the default run
def test_default_run_reaches_the_documented_accuracy(tmp_path):
    """The default job, unchanged but for the CSV logger and where it writes: its accuracy must stay
    just under what the documented run reaches (README: dev 0.837, test 0.845 on transformers 5.23;
    chance is 0.5), so a change that quietly costs accuracy fails here."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "train.py", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}",
         f"paths.cache_dir={tmp_path / 'cache'}"],  # a fresh tokenization cache, never a stale one
        cwd=root, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed"
    metrics = results["metrics"]
    assert metrics["test"]["test/acc"] >= 0.83, metrics
    assert metrics["best"]["val/acc_best"] >= 0.82, metrics
