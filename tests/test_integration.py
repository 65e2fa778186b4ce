"""End to end on the real embedded backbone (all-MiniLM-L6-v2) and the embedded Rotten Tomatoes data."""
import json

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
    assert results["metrics"]["test"]["test/acc"] > 0.6, results["metrics"]  # chance is 0.5; 512 examples
    assert results["metrics"]["best"]["val/acc_best"] > 0.6
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
