"""Train -> save -> predict reproduces the validation metric the run logged."""
import json
import subprocess
import sys

from test_reliability import ROOT, run

from peft_lightning.data.datamodule import load_raw
from peft_lightning.tasks import make_task


def test_predict_reproduces_the_logged_validation_accuracy(tmp_path):
    proc, results = run(tmp_path / "run", "data.eval_batch_size=64")  # SMALL: 2 validation batches
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = results["metrics"]["best"]["val/acc_best"]
    validation = load_raw("embedded:rotten_tomatoes", {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 42},
                          make_task("classification", ["negative", "positive"]))[0]["validation"]
    examples = validation.select(range(128))  # the two validation batches the run scored
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in examples["text"]))
    out = subprocess.run([sys.executable, "-m", "peft_lightning.predict", results["adapter"], "--input",
                          str(tmp_path / "in.jsonl"), "--batch-size", "50"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["text"] for r in rows] == examples["text"]
    labels = ["negative", "positive"]
    accuracy = sum(labels.index(r["label"]) == y for r, y in zip(rows, examples["label"])) / len(rows)
    assert abs(accuracy - logged) < 1e-6, (accuracy, logged)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)


def test_predict_names_a_bad_adapter_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "peft_lightning.predict", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, input="hello\n")
    assert out.returncode == 2 and "adapter_config.json not found" in out.stderr
