"""Bad input gets a clear error naming what to fix; faults lose nothing; resumes are exact."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_configs import compose_cfg

from peft_lightning.data.datamodule import load_raw
from peft_lightning.data.files import read_rows, to_roles
from peft_lightning.tasks import make_task
from peft_lightning.faults import AtomicCheckpointIO
from peft_lightning.validation import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
# a small real run: tiny random BERT on the embedded data, 2 epochs of 12 batches
SMALL = ["model=tiny-bert", "logger=csv", "trainer.max_epochs=2", "+trainer.limit_train_batches=12",
         "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "data.batch_size=8",
         "method.prefix_dropout=0.1"]


def run(out: Path, *overrides, timeout=240):
    proc = subprocess.run([sys.executable, "train.py", *SMALL, f"hydra.run.dir={out}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return proc, results


def fault(**kw):
    return ["+callbacks.fault._target_=peft_lightning.faults.FaultInjection",
            *[f"+callbacks.fault.{k}={v}" for k, v in kw.items()]]


# --- config errors: before any model load, naming key and accepted values ----------------------
@pytest.mark.parametrize("overrides,message", [
    (["method.prefix_length=0"], "method.prefix_length must be a positive integer, got 0"),
    (["method.prefix_length=1.5"], "method.prefix_length must be a positive integer, got 1.5"),
    (["method.optim.lr=0"], "method.optim.lr must be a positive number, got 0"),
    (["method.depth=[0,7]"], r"layer index \[7\] out of range: model=minilm has layers 0..5"),
    (["model=tiny-bert", "model.config.model_type=distilbert"],
     r"does not support model=tiny-bert \(architecture 'distilbert'\); supported architectures: \['bart', 'bert', "
     r"'deberta-v2', 'gpt2', 'llama', 'qwen2', 'roberta', 't5'\]"),
    (["method=adapter", "method.style=serial"], r"method.style must be one of \('houlsby', 'pfeiffer'\), got 'serial'"),
    (["method=lora", "method.r=0"], "method.r must be a positive integer, got 0"),
    (["++method.head.type=mlp"], r"method.head.type must be one of \('linear', 'verbalizer'\), got 'mlp'"),
    (["method=prompt_tuning", "method.init=text"], "method.init=text needs method.init_text"),
    (["++data.train_examples=1.5"], r"data.train_examples must be a positive count or a fraction in \(0, 1\], got 1.5"),
])
def test_config_errors_name_the_key(overrides, message, monkeypatch):
    import peft_lightning.backbone as backbone

    def no_weights(*a, **k):
        raise AssertionError("a model was loaded before validation")

    monkeypatch.setattr(backbone, "load_backbone", no_weights)
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg(overrides))


def test_config_error_from_the_command_line_has_no_traceback(tmp_path):
    proc, results = run(tmp_path / "r", "method.prefix_length=-2")
    assert proc.returncode == 2
    assert "config error: method.prefix_length must be a positive integer, got -2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert results["status"] == "failed"


# --- data errors: file, column, row -------------------------------------------------------------
LABELS = ["negative", "positive"]


@pytest.mark.parametrize("name,content,message", [
    ("missing.csv", None, r"data file .*missing.csv not found"),
    ("nocol.csv", "sentence,label\nhello,positive\n", r"nocol.csv, line 2: column 'text' missing"),
    ("badlabel.csv", "text,label\ngood,positive\nbad,neutral\n",
     r"badlabel.csv, line 3, column 'label': label 'neutral' is not in data.labels"),
    ("badindex.tsv", "text\tlabel\ngood\t1\nbad\t5\n", r"badindex.tsv, line 3, column 'label': label '5'"),
    ("fields.csv", "text,label\ngood,positive,extra\n", r"fields.csv, line 2: 3 fields, the header has 2"),
    ("broken.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": \n', r"broken.jsonl, line 2: not valid JSON"),
    ("latin1.csv", b"text,label\ngood,positive\ncaf\xe9,negative\n", r"latin1.csv, line 3: not valid UTF-8"),
    ("empty.csv", "text,label\n", r"empty.csv: no data rows"),
])
def test_data_errors_name_file_column_row(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises((ValueError, KeyError, FileNotFoundError), match=message):
        to_roles(read_rows(path), {"text": "text", "label": "label"}, make_task("classification", LABELS), str(path))


def test_empty_split_is_named(tmp_path):
    from peft_lightning.data import TextClassificationDataModule

    for split, rows in (("train", 4), ("validation", 2), ("test", 0)):
        body = "".join(f"text {i},positive\n" for i in range(rows))
        (tmp_path / f"{split}.csv").write_text("text,label\n" + body)
    files = {s: str(tmp_path / f"{s}.csv") for s in ("train", "validation", "test")}
    with pytest.raises(ValueError, match=r"test.csv: no data rows"):
        load_raw("", {}, make_task("classification", LABELS), None, files)
    dm = TextClassificationDataModule(tokenizer=None, source="", labels=LABELS, split={"train": 1.0, "validation": 0.0,
                                      "test": 0.0}, files=None)
    dm.source = str(tmp_path / "train.csv")
    with pytest.raises(ValueError, match=r"data split .validation. of .*train.csv is empty"):
        dm.setup()


def test_local_file_trains_through_the_datamodule(tmp_path):
    from transformers import AutoTokenizer

    from peft_lightning.backbone import resolve
    from peft_lightning.data import TextClassificationDataModule

    rows = "".join(f'{{"sentence": "a {"great" if i % 2 else "bad"} film {i}", "y": "{LABELS[i % 2]}"}}\n'
                   for i in range(40))
    (tmp_path / "d.jsonl").write_text(rows)
    tok = AutoTokenizer.from_pretrained(resolve("embedded:minilm")[0])
    dm = TextClassificationDataModule(tok, source=str(tmp_path / "d.jsonl"), labels=LABELS,
                                      columns={"text": "sentence", "label": "y"}, batch_size=4)
    dm.setup()
    assert sum(len(dm.data[s]) for s in ("train", "validation", "test")) == 40
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["labels"].tolist()) <= {0, 1} and batch["input_ids"].shape[0] == 4


# --- faults ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    proc, results = run(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return results


def test_same_seed_same_metrics(straight, tmp_path):
    proc, again = run(tmp_path / "again")
    assert proc.returncode == 0
    assert again["metrics"]["final"] == straight["metrics"]["final"]
    assert again["metrics"]["test"] == straight["metrics"]["test"]


@pytest.mark.parametrize("sig,code", [("SIGTERM", 128 + signal.SIGTERM), ("SIGINT", 128 + signal.SIGINT)])
def test_signal_saves_checkpoint_and_resume_matches_uninterrupted(straight, tmp_path, sig, code):
    proc, first = run(tmp_path / "first", *fault(signal_at_step=7, signal=sig))  # mid-epoch 0
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert first["status"] == "interrupted" and first["global_step"] == 7
    ckpt = Path(first["resume_from"])
    assert ckpt.exists()
    proc, resumed = run(tmp_path / "resumed", f"ckpt_path={ckpt}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert resumed["global_step"] == straight["global_step"] == 24
    assert resumed["metrics"]["final"] == straight["metrics"]["final"]
    assert resumed["metrics"]["test"] == straight["metrics"]["test"]


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    proc, results = run(tmp_path / "r", *fault(nan_at_step=15))  # in epoch 1, after epoch 0's checkpoints
    assert proc.returncode != 0
    assert "Loss became nan at step 15" in proc.stderr
    assert results["status"] == "failed" and "Loss became nan" in results["error"]
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 12
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (tmp_path / "r" / "checkpoints" / "interrupted.ckpt").exists()


def test_corrupt_checkpoint_gives_clear_error(straight, tmp_path):
    last = Path(straight["best_checkpoint"]).parent / "last.ckpt"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(last.read_bytes()[:1000])
    proc, results = run(tmp_path / "r", f"ckpt_path={bad}")
    assert proc.returncode != 0
    assert f"checkpoint {bad} is truncated or corrupt" in proc.stderr
    proc, _ = run(tmp_path / "r2", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    assert f"checkpoint {tmp_path / 'nope.ckpt'} not found" in proc.stderr


def test_checkpoint_of_another_shape_names_both_shapes(straight, tmp_path):
    last = Path(straight["best_checkpoint"]).parent / "last.ckpt"
    proc, _ = run(tmp_path / "r", f"ckpt_path={last}", "method.prefix_length=5")
    assert proc.returncode != 0
    # tiny-bert: 2 layers x 2 (key, value) x hidden 32 = 128 values per virtual token
    assert "torch.Size([16, 128])" in proc.stderr and "torch.Size([5, 128])" in proc.stderr


def test_atomic_checkpoint_write_never_leaves_half_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    good = path.read_bytes()

    def killed_mid_write(checkpoint, filepath):
        Path(filepath).write_bytes(b"half")
        raise KeyboardInterrupt

    import lightning.fabric.plugins.io.torch_io as torch_plugin  # where TorchCheckpointIO writes

    monkeypatch.setattr(torch_plugin, "_atomic_save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == good  # the previous checkpoint is intact under the final name


def test_crash_in_one_multirun_job_keeps_the_others(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", *SMALL, "trainer.max_epochs=1", f"hydra.sweep.dir={tmp_path}",
         "+callbacks.fault._target_=peft_lightning.faults.FaultInjection", "+callbacks.fault.nan_at_step=3,1000"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0  # the sweep reports the failure...
    failed = json.loads((tmp_path / "0" / "results.json").read_text())
    done = json.loads((tmp_path / "1" / "results.json").read_text())
    assert failed["status"] == "failed" and "Loss became nan" in failed["error"]
    assert done["status"] == "completed" and done["metrics"]["test"]  # ...and the other job finished
    from peft_lightning.report import collect, markdown

    report = markdown(collect(tmp_path), "t")
    assert "job 0 (callbacks.fault.nan_at_step=3): failed: FloatingPointError: Loss became nan" in report
