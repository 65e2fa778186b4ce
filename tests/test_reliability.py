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
    (["++method.head.type=mlp"], r"method.head.type must be one of \('linear', 'pooler', 'verbalizer'\), got 'mlp'"),
    (["method=prompt_tuning", "method.init=text"], "method.init=text needs method.init_text"),
    (["++data.train_examples=1.5"], r"data.train_examples must be a positive count or a fraction in \(0, 1\], got 1.5"),
    # a low-data sweep (max_epochs -1, a budget of steps) taken back to epochs by dropping the step budget only
    (["+sweeps=transfer", "trainer.max_steps=-1"], r"trainer.max_epochs=-1 and trainer.max_steps=-1: no end to "
     r"training .* set trainer.max_steps .* or trainer.max_epochs"),
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


def resume(ckpt: Path, *overrides, timeout=240):
    """Resume as the README says, with no output folder given: the run goes on in the folder that
    holds the checkpoint's checkpoints/; (process, that folder's results.json)."""
    proc = subprocess.run([sys.executable, "train.py", *SMALL, f"ckpt_path={ckpt}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc, json.loads((ckpt.parent.parent / "results.json").read_text())


def assert_same_run(resumed, straight):
    """Bit-identical final, best and test metrics, and the same best checkpoint (epoch and score)."""
    assert resumed["status"] == "completed" and resumed["global_step"] == straight["global_step"] == 24
    for part in ("final", "best", "test"):
        assert resumed["metrics"][part] == straight["metrics"][part], part
    best = ("best_epoch", "best_step", "best_score")
    assert [resumed[k] for k in best] == [straight[k] for k in best] and straight["best_step"] > 0
    assert Path(resumed["best_checkpoint"]).name == Path(straight["best_checkpoint"]).name
    assert Path(resumed["best_checkpoint"]).is_file()


def test_same_seed_same_metrics(straight, tmp_path):
    proc, again = run(tmp_path / "again")
    assert proc.returncode == 0
    # dev after each epoch's last update: every update validated, the test is the best-dev checkpoint's
    assert "unvalidated_updates" not in straight and "selection" not in straight
    assert again["metrics"]["final"] == straight["metrics"]["final"]
    assert again["metrics"]["test"] == straight["metrics"]["test"]


@pytest.mark.parametrize("sig,code", [("SIGTERM", 128 + signal.SIGTERM), ("SIGINT", 128 + signal.SIGINT)])
def test_signal_saves_checkpoint_and_resume_matches_uninterrupted(straight, tmp_path, sig, code):
    proc, first = run(tmp_path / "run", *fault(signal_at_step=7, signal=sig))  # mid-epoch 0
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert first["status"] == "interrupted" and first["global_step"] == 7
    ckpt = Path(first["resume_from"])
    assert ckpt == tmp_path / "run" / "checkpoints" / "interrupted.ckpt" and ckpt.exists()
    proc, resumed = resume(ckpt)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(resumed, straight)
    # the same folder: the first attempt's results and config are kept, the resume's config beside them
    assert [a["status"] for a in resumed["previous_attempts"]] == ["interrupted"]
    assert "ckpt_path" not in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()
    attempts = list((tmp_path / "run" / ".hydra").glob("attempt-*/overrides.yaml"))
    assert len(attempts) == 1 and f"ckpt_path={ckpt}" in attempts[0].read_text()


@pytest.mark.parametrize("step", [24, pytest.param(12, marks=pytest.mark.slow)])  # epoch 1's / epoch 0's validation
def test_sigterm_during_validation_reruns_that_validation(straight, tmp_path, step):
    proc, first = run(tmp_path / "run", *fault(signal_in="validation", signal_at_step=step, signal_at_batch=0))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert first["status"] == "interrupted" and first["global_step"] == step
    proc, resumed = resume(Path(first["resume_from"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(resumed, straight)


def test_sigterm_during_test_resumes_from_the_finished_training(straight, tmp_path):
    proc, first = run(tmp_path / "run", *fault(signal_in="test", signal_at_batch=0))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert first["status"] == "interrupted" and first["global_step"] == 24
    assert first["metrics"]["final"] == straight["metrics"]["final"] and first["metrics"]["test"] == {}
    # training was complete: nothing new to save, the resume starts from last.ckpt and only tests
    assert first["resume_from"] == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert not (tmp_path / "run" / "checkpoints" / "interrupted.ckpt").exists()
    proc, resumed = resume(Path(first["resume_from"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(resumed, straight)


def test_sigkill_then_resume_from_last_checkpoint(straight, tmp_path):
    proc, first = run(tmp_path / "run", *fault(signal_at_step=17, signal="SIGKILL"))  # epoch 1, after last.ckpt
    assert proc.returncode == -signal.SIGKILL
    assert first["status"] == "running"  # all a killed process leaves
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 12
    # given another output folder, the resume still continues in the run's own folder
    proc, resumed = resume(last, f"hydra.run.dir={tmp_path / 'elsewhere'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(resumed, straight)
    assert not (tmp_path / "elsewhere" / "results.json").exists()


def test_a_step_checkpoint_written_just_before_a_dev_evaluation_resumes_with_that_evaluation(straight, tmp_path):
    """last.ckpt every 12 updates: the one at update 24 is written at epoch 1's last batch, before epoch 1's
    dev evaluation. Lightning resumes as if that evaluation had run after the save and skips it: the resume
    of this finished run tested the best checkpoint of epoch 0, which epoch 1's better one had deleted
    (FileNotFoundError, exit 1); killed between the save and the evaluation, a run lost it silently. The
    resume runs it, and finishes as the uninterrupted run did."""
    every = "+callbacks.last_checkpoint.every_n_train_steps=12"
    proc, first = run(tmp_path / "run", every)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 24
    proc, resumed = resume(last, every)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert resumed["status"] == "completed" and resumed["global_step"] == straight["global_step"] == 24
    for part in ("final", "best", "test"):
        assert resumed["metrics"][part] == straight["metrics"][part], part
    best = ("best_epoch", "best_step", "best_score")
    assert [resumed[k] for k in best] == [straight[k] for k in best] and straight["best_epoch"] == 1
    assert Path(resumed["best_checkpoint"]).is_file()


@pytest.mark.slow  # three small runs (~60 s)
def test_a_mid_epoch_step_checkpoint_resumes_exactly(tmp_path):
    """Dev every 6 updates and last.ckpt every 6 (written at the batch's end, before its evaluation); killed in
    the evaluation after update 18, mid-epoch. The resume runs that evaluation again and trains on from the
    epoch's 7th batch: before, it skipped the evaluation, and it skipped one batch too few of the epoch's order
    (the checkpoint counts the batch trained but not completed), so a batch was trained twice, exit 0."""
    every = ["+trainer.val_check_interval=6", "+callbacks.last_checkpoint.every_n_train_steps=6"]
    proc, straight = run(tmp_path / "straight", *every)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc, first = run(tmp_path / "run", *every, *fault(signal="SIGKILL", signal_in="validation", signal_at_step=18))
    assert proc.returncode == -signal.SIGKILL
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 18
    proc, resumed = resume(last, *every)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert resumed["global_step"] == straight["global_step"] == 24
    for part in ("final", "best", "test"):
        assert resumed["metrics"][part] == straight["metrics"][part], part
    import pandas as pd

    def curve(folder, column):  # every logged value of a column, by step, over the attempts' CSV versions
        rows = pd.concat(pd.read_csv(f) for f in sorted((folder / "csv").glob("version_*/metrics.csv")))
        rows = rows.dropna(subset=[column])
        return dict(zip(rows["step"], rows[column]))

    assert curve(tmp_path / "run", "val/loss") == curve(tmp_path / "straight", "val/loss")  # update 18's included
    assert curve(tmp_path / "run", "train/loss") == curve(tmp_path / "straight", "train/loss")


class _Regression:
    """A one-layer regression LightningModule for resume tests of the loop state alone (no data pipeline):
    each training batch is a function of (epoch, batch index), so a resume trains on the same data without a
    resumable loader; `validated` lists the update each dev evaluation of a fit saw."""

    @staticmethod
    def make():
        import lightning.pytorch as pl
        from torch.utils.data import DataLoader

        class Regression(pl.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.layer = torch.nn.Linear(4, 1)
                self.validated = []

            def training_step(self, batch, batch_idx):
                x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * self.current_epoch + batch_idx))
                return ((self.layer(x) - x.sum(1, keepdim=True)) ** 2).mean()

            def validation_step(self, batch, batch_idx):
                self.log("val/loss", self.layer.weight.sum())

            def on_validation_epoch_end(self):
                self.validated.append(self.global_step)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05)

            def train_dataloader(self):
                return DataLoader(range(12), batch_size=1)

            def val_dataloader(self):
                return DataLoader(range(2), batch_size=1)

        return Regression()

    @staticmethod
    def fit(tmp_path, *callbacks, ckpt_path=None, **trainer):
        import lightning.pytorch as pl

        from peft_lightning.faults import ExactResume

        module = _Regression.make()
        pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu", num_sanity_val_steps=0, callbacks=[ExactResume(0), *callbacks],
                   **trainer).fit(module, ckpt_path=ckpt_path)
        return module


def test_a_step_checkpoint_at_max_steps_resumes_with_its_dev_evaluation(tmp_path):
    """max_steps=6 with dev every 6 batches: the step checkpoint of update 6 is written before update 6's
    evaluation. Lightning's fit loop ends at once on a resume that is at max_steps, so the evaluation the
    checkpoint leaves to the resume never ran: the resumed run had no final dev score, selected nothing (or
    an older best) and tested the last model. It runs now, once, and training stops at max_steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    limits = dict(max_epochs=2, max_steps=6, val_check_interval=6)
    saver = lambda: ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=6, save_top_k=-1)
    straight = _Regression.fit(tmp_path, saver(), **limits)
    assert straight.validated == [6]
    resumed = _Regression.fit(tmp_path, saver(), ckpt_path=tmp_path / "ckpt" / "step=6.ckpt", **limits)
    assert resumed.validated == [6] and resumed.global_step == 6
    assert torch.equal(resumed.layer.weight, straight.layer.weight)


def test_a_checkpoint_written_mid_gradient_accumulation_resumes_exactly(tmp_path):
    """accumulate_grad_batches=2: a checkpoint written after the 7th batch (an interrupt there, a step
    checkpoint at a resume's first batch, or a dev evaluation every 3 batches) holds the weights of update 3,
    and batch 7's gradient waits in .grad for update 4. The resume dropped it: update 4 was batch 8's gradient
    alone, and every update after it differed. The gradient travels in the checkpoint."""
    from lightning.pytorch import Callback

    class SaveAfter7th(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 6 and trainer.current_epoch == 0:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    limits = dict(max_epochs=2, accumulate_grad_batches=2, limit_val_batches=0)
    straight = _Regression.fit(tmp_path, SaveAfter7th(), **limits)
    assert torch.load(tmp_path / "mid.ckpt", weights_only=True)["global_step"] == 3
    resumed = _Regression.fit(tmp_path, ckpt_path=tmp_path / "mid.ckpt", **limits)
    assert resumed.global_step == straight.global_step == 12
    assert torch.equal(resumed.layer.weight, straight.layer.weight)
    assert torch.equal(resumed.layer.bias, straight.layer.bias)


def test_last_checkpoint_is_the_latest_validation(straight, tmp_path):
    """Lightning 2.6 writes ModelCheckpoint(save_last=True)'s last.ckpt only when a top-k checkpoint is
    saved: with epoch 0 the best, last.ckpt would stay at step 12. Ours follows every validation.
    The case needs the best at epoch 0: if the straight run's best is epoch 1, selecting the minimum
    instead puts it at epoch 0 (a tie keeps the first)."""
    results = straight
    if straight["best_epoch"] != 0:
        proc, results = run(tmp_path / "min", "callbacks.model_checkpoint.mode=min")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert results["best_epoch"] == 0
    last = torch.load(Path(results["best_checkpoint"]).parent / "last.ckpt", weights_only=True)
    assert last["global_step"] == 24


@pytest.mark.parametrize("phase", ["init", "setup"])  # model built / data loaded, before fit starts
def test_sigterm_during_setup_leaves_results(tmp_path, phase):
    proc, results = run(tmp_path / "r", *fault(signal_in=phase))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert results["status"] == "interrupted" and "resume_from" not in results
    assert not (tmp_path / "r" / "checkpoints" / "interrupted.ckpt").exists()  # nothing trained, nothing saved


def test_max_epochs_zero_is_not_reported_as_trained(tmp_path):
    proc, results = run(tmp_path / "r", "trainer.max_epochs=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no training step ran" in proc.stdout + proc.stderr
    assert results["status"] == "not_trained" and results["global_step"] == 0
    assert results["metrics"]["final"] == {} and results["metrics"]["test"]  # the untrained model's test
    assert "adapter" not in results and not (tmp_path / "r" / "adapter").exists()


def test_a_step_budget_that_ends_mid_epoch_names_the_updates_no_validation_saw(tmp_path):
    """Dev at each epoch end (12 updates) and max_steps=18: Lightning stops at update 18 without a
    validation, so updates 13-18 are trained, never scored, and can never be selected."""
    proc, results = run(tmp_path / "r", "+trainer.max_steps=18")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert results["global_step"] == 18 and results["unvalidated_updates"] == 6
    assert results["best_step"] == 12  # the only validated update
    assert "the last 6 updates (after update 12 of 18) were never validated" in proc.stdout + proc.stderr
    # one full epoch and half of the next: Lightning's current_epoch says 2 here, and 1 on a resume
    assert results["epochs_completed"] == 1
    proc, results = run(tmp_path / "again", "+trainer.max_steps=18",
                        f"ckpt_path={tmp_path / 'r' / 'checkpoints' / 'last.ckpt'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "r" / "results.json").read_text())  # (a resume goes on in the run's folder)
    assert results["global_step"] == 18 and results["epochs_completed"] == 1


def test_dev_every_few_batches_in_each_epoch_counts_the_updates_after_the_last_one(tmp_path):
    """val_check_interval=5 batches, counted from each epoch's start (12 batches): dev after updates 5,
    10, 17, 22. max_steps=15 is a multiple of 5 and still ends 5 updates after the last dev (10): the
    count is exact, and the advice does not say a multiple of val_check_interval would do."""
    proc, results = run(tmp_path / "r", "+trainer.max_steps=15", "+trainer.val_check_interval=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert results["global_step"] == 15 and results["unvalidated_updates"] == 5 and results["best_step"] <= 10
    out = proc.stdout + proc.stderr
    assert "the last 5 updates (after update 10 of 15) were never validated" in out
    assert "a multiple of trainer.val_check_interval" not in out
    assert "from each epoch's start unless trainer.check_val_every_n_epoch=null" in out


def test_without_a_monitored_checkpoint_the_test_is_named_the_last_models(tmp_path):
    """callbacks=none: Lightning's own checkpoint keeps the last epoch. Dev ran, but nothing was
    selected on it: no best_step/best_epoch that would read as a selected checkpoint, and the
    selection is named (the report counts its dev value, not its test). With a step budget
    that ends mid-epoch (18 of 2 x 12) the tested model is update 18's, which no dev score saw: the
    unvalidated-updates warning must say that, not that the test is from update 12 at the latest."""
    proc, results = run(tmp_path / "r", "callbacks=none", "+trainer.max_steps=18")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert results["status"] == "completed" and results["metrics"]["best"]  # dev ran
    assert results["selection"] == "last (no checkpoint callback monitors the dev metric)"
    assert results["best_checkpoint"] == "" and "best_step" not in results and "best_epoch" not in results
    out = proc.stdout + proc.stderr
    assert "no checkpoint callback monitors the dev metric" in out
    assert results["global_step"] == 18 and results["unvalidated_updates"] == 6
    assert "the tested and exported model is the last one (update 18)" in out
    assert "from update 12 at the latest" not in out


@pytest.mark.parametrize("overrides,why,warning", [
    # the monitoring checkpoint exists but saves only every 5 epochs, and the run has 1
    (["trainer.max_epochs=1", "+callbacks.model_checkpoint.every_n_epochs=5"],
     "the checkpoint callback that monitors val/acc saved no checkpoint", "the test metrics and the adapter are the "
                                                                          "last model's"),
    (["debug=fast_dev_run"], "fast_dev_run writes no checkpoint", "nothing is tested or exported"),
])
def test_a_monitored_checkpoint_that_saved_nothing_is_not_called_missing(overrides, why, warning, tmp_path):
    """Nothing selected on dev although a checkpoint callback monitors it: the selection says why,
    not that no callback monitors the dev metric (one does)."""
    proc, results = run(tmp_path / "r", *overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert results["selection"] == f"last ({why})" and results["best_checkpoint"] == ""
    out = proc.stdout + proc.stderr
    assert f"{why}, so no checkpoint was selected on dev: {warning} (selection: last)" in out
    assert "no checkpoint callback monitors" not in out


def test_moved_run_folder_keeps_the_best_model_record(tmp_path):
    """A checkpoint written in another folder (the run folder was moved): ModelCheckpoint would drop
    its best-model record ("dirpath has changed"); ExactResume rebases it when the files are there."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from peft_lightning.faults import ExactResume

    new = tmp_path / "moved" / "checkpoints"
    new.mkdir(parents=True)
    for name in ("epoch00-acc0.5234.ckpt", "last.ckpt"):
        (new / name).write_bytes(b"x")
    cb = ModelCheckpoint(dirpath=new, monitor="val/acc", mode="max")
    old, score = "/gone/run/checkpoints", torch.tensor(0.5234)
    best = f"{old}/epoch00-acc0.5234.ckpt"
    state = {"monitor": "val/acc", "best_model_score": score, "dirpath": old, "best_model_path": best,
             "kth_best_model_path": best, "best_k_models": {best: score}, "kth_value": score,
             "last_model_path": f"{old}/last.ckpt", "current_score": torch.tensor(0.5)}
    checkpoint = {"callbacks": {cb.state_key: state}}
    trainer = SimpleNamespace(checkpoint_callbacks=[cb], state=SimpleNamespace(fn=None))  # (a trainer loading to test)
    ExactResume(seed=0).on_load_checkpoint(trainer, None, checkpoint)
    cb.load_state_dict(checkpoint["callbacks"][cb.state_key])
    assert cb.best_model_path == str(new / "epoch00-acc0.5234.ckpt") and cb.best_model_score == score
    assert list(cb.best_k_models) == [str(new / "epoch00-acc0.5234.ckpt")]


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    proc, results = run(tmp_path / "r", *fault(nan_at_step=15))  # in epoch 1, after epoch 0's checkpoints
    # a crash, not a config error: its traceback (the raising line; an installed excepthook may print it without
    # Python's "Traceback" header) and exit 1 (train.py's one-line errors are for bad input)
    assert proc.returncode == 1 and "raise FloatingPointError(" in proc.stderr and "config error" not in proc.stderr
    assert "Loss became nan at step 15" in proc.stderr
    assert results["status"] == "failed" and "Loss became nan" in results["error"]
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 12
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (tmp_path / "r" / "checkpoints" / "interrupted.ckpt").exists()


def test_corrupt_checkpoint_gives_clear_error(straight, tmp_path):
    last = Path(straight["best_checkpoint"]).parent / "last.ckpt"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(last.read_bytes()[:1000])
    proc, results = run(tmp_path / "r", f"ckpt_path={bad}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint {bad} is truncated or corrupt (RuntimeError); "
                                                "resume from another one, e.g. checkpoints/last.ckpt"]
    assert results["status"] == "failed"
    proc, _ = run(tmp_path / "r2", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    assert f"checkpoint {tmp_path / 'nope.ckpt'} not found" in proc.stderr


class _Payload:
    """Unpickling this opens (creates) the file: what a crafted checkpoint could do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_checkpoint_with_code_is_refused_without_running_it(tmp_path, writer):
    import pickle

    from peft_lightning.errors import CheckpointError
    from peft_lightning.faults import check_checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoints" / "evil.ckpt"  # where a run's checkpoints are: resumed in that folder
    evil.parent.mkdir()
    payload = {"state_dict": {}, "epoch": 0, "x": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=rf"checkpoint {evil} refused: it holds Python objects beyond tensors"):
        check_checkpoint(evil)
    assert not marker.exists()
    if writer == "pickle":
        return  # (one command-line run is enough)
    proc = subprocess.run([sys.executable, "train.py", *SMALL, f"ckpt_path={evil}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint {evil} refused: it holds Python objects beyond tensors and plain data (io.open), and "
        "loading them could run code; resume from a checkpoint this framework wrote"]
    assert not marker.exists()
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


def test_checkpoint_of_another_shape_names_both_shapes(straight, tmp_path):
    copy = tmp_path / "copied.ckpt"  # (a checkpoint outside a run folder: this run keeps its own folder)
    copy.write_bytes((Path(straight["best_checkpoint"]).parent / "last.ckpt").read_bytes())
    proc, _ = run(tmp_path / "r", f"ckpt_path={copy}", "method.prefix_length=5")
    # tiny-bert: 2 layers x 2 (key, value) x hidden 32 = 128 values per virtual token; a user error, no traceback
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {copy}: tensor prefix.encoder.embedding.weight has shape torch.Size([16, 128]), this "
        "run's settings build torch.Size([5, 128]); resume with the run's own settings")


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


def test_a_config_error_in_one_multirun_job_keeps_the_others(tmp_path):
    """A value valid for one job and not another (data.batch_size=0,-1): each job fails on its own
    (results.json `failed`, why), the next still runs, and the sweep ends with the first one's config
    error: one line, exit 2 (not the whole sweep stopped at the first job)."""
    proc = subprocess.run([sys.executable, "train.py", "-m", *SMALL, f"hydra.sweep.dir={tmp_path}",
                           "data.batch_size=0,-1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for job, value in (("0", 0), ("1", -1)):
        results = json.loads((tmp_path / job / "results.json").read_text())
        assert results["status"] == "failed"
        assert results["error"] == f"ConfigError: data.batch_size must be a positive integer, got {value}"
    assert proc.stderr.strip().splitlines()[-1] == "config error: data.batch_size must be a positive integer, got 0"
    assert "Traceback" not in proc.stderr


def test_resume_with_other_settings_says_which(tmp_path, caplog):
    from omegaconf import OmegaConf

    from peft_lightning.run import warn_if_settings_differ

    original = tmp_path / ".hydra" / "config.yaml"
    original.parent.mkdir()
    cfg = compose_cfg(["model=tiny-bert", "+callbacks.fault._target_=x"])
    original.write_text(OmegaConf.to_yaml(cfg))
    resumed = compose_cfg(["model=tiny-bert", "ckpt_path=/r/checkpoints/last.ckpt"])  # the same run: quiet
    with caplog.at_level("WARNING"):
        warn_if_settings_differ(resumed, original)
        assert not caplog.records
        warn_if_settings_differ(compose_cfg(["model=tiny-bert", "trainer.max_epochs=5", "data.batch_size=4"]), original)
    assert caplog.records[0].getMessage().endswith("data.batch_size: 32 -> 4; trainer.max_epochs: 3 -> 5")


def test_a_sigterm_a_library_swallows_still_interrupts_the_run():
    """datasets catches whatever is raised while it hashes a map function, the SIGTERMException
    of a SIGTERM in tokenization included: the run must still end as interrupted, not completed."""
    import os

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from peft_lightning.faults import interrupt_on_sigterm, raise_if_sigterm_swallowed

    restore = interrupt_on_sigterm()
    try:
        raise_if_sigterm_swallowed()  # nothing received yet: no-op
        try:  # what datasets does
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException:  # noqa: BLE001
            pass
        with pytest.raises(SIGTERMException):
            raise_if_sigterm_swallowed()
    finally:
        restore()


def test_dropout_seeds_are_a_function_of_the_step_and_differ_per_rank():
    from peft_lightning.faults import step_seed

    assert step_seed(42, 1, 3) == step_seed(42, 1, 3, rank=0)  # a resume draws the same seeds
    seeds = {step_seed(42, e, b, r) for e in range(2) for b in range(3) for r in range(2)}
    assert len(seeds) == 12  # each (epoch, batch, rank) its own stream


@pytest.mark.parametrize("overrides,message", [
    ([], None),  # 300 steps, dev every 30: the last update validated
    (["trainer.max_steps=100"], "the last 10 updates after update 90 are never validated, and the checkpoint "
                                "tested and exported is from update 90 at the latest"),
    (["trainer.val_check_interval=400"], "no validation runs at all"),
    # no dev batches: no update is validated (not 'the checkpoint tested is from update 90'); run.py names it
    (["trainer.max_steps=100", "+trainer.limit_val_batches=0"], None),
    # nothing selects on dev (callbacks=none): the last model is what is tested, and no dev score saw it
    (["trainer.max_steps=100", "callbacks=none"], "the last 10 updates after update 90 are never validated, and "
                                                  "the tested and exported model is the last one (update 100)"),
    # an EarlyStopping monitors the dev metric but selects nothing: still the last model
    (["trainer.max_steps=100", "callbacks=none", "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping",
      "+callbacks.stop.monitor=val/acc", "+callbacks.stop.mode=max"], "the tested and exported model is the last one"),
    # accumulation: an epoch's last batch steps too, so the batches per update vary (at 50 examples, 2 batches
    # an epoch, every update is 2 batches, not 3): the risk is named without counts that would be wrong
    (["trainer.max_steps=100", "+trainer.accumulate_grad_batches=3"], "updates after the last multiple of the "
                                                                       "interval are never validated"),
    (["trainer.max_epochs=5"], "updates after the last multiple of the interval are never validated"),
])
def test_a_step_budget_the_dev_interval_does_not_divide_is_named(overrides, message, caplog):
    """The low-data sweeps validate every val_check_interval batches across epochs, never at the end on
    their own: a shortened budget (a smoke run) would silently train updates that dev never sees."""
    with caplog.at_level("WARNING", logger="peft_lightning.validation"):
        validate_config(compose_cfg(["+sweeps=transfer", "model=tiny-bert", "method.init=random", *overrides]))
    found = [r.getMessage() for r in caplog.records if "val_check_interval" in r.getMessage()]
    assert (found == []) if message is None else (len(found) == 1 and message in found[0]), found


# --- epochs_completed: full epochs, whatever path the fit took ------------------------------------
class _Tiny(__import__("lightning").pytorch.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(8, 2))
        return torch.utils.data.DataLoader(data, batch_size=2)  # 4 batches an epoch


def _fit(tmp_path, ckpt_path=None, every_n_train_steps=4, **limits):
    """A fit of the toy module writing last.ckpt every 4 updates (every_n_train_steps: saved in
    on_train_batch_end, the epoch's last batch not yet counted completed), or with None where ours
    does (callbacks/default.yaml's last_checkpoint: after a validation, else at the end of an epoch or
    of the fit); its full_epochs."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from peft_lightning.run import FullEpochs, full_epochs

    last = ModelCheckpoint(dirpath=tmp_path, filename="last", every_n_train_steps=every_n_train_steps,
                           enable_version_counter=False)
    trainer = pl.Trainer(callbacks=[last, FullEpochs()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, **limits)
    trainer.fit(_Tiny(), ckpt_path=ckpt_path)
    return full_epochs(trainer), trainer.global_step


@pytest.mark.parametrize("first,then,expected", [
    ({"max_epochs": 2}, None, (2, 8)),  # straight: two epochs of 4 batches
    ({"max_epochs": -1, "max_steps": 6}, None, (1, 6)),  # max_steps ends epoch 2 half way
    ({"max_epochs": 1}, {"max_epochs": 2}, (2, 8)),  # a longer max_epochs on resume: one more epoch
    ({"max_epochs": 1}, {"max_epochs": 3}, (3, 12)),
    ({"max_epochs": -1, "max_steps": 8}, {"max_epochs": -1, "max_steps": 8}, (2, 8)),  # resume of a finished fit
    ({"max_epochs": -1, "max_steps": 4}, {"max_epochs": -1, "max_steps": 6}, (1, 6)),
])
def test_full_epochs_counts_every_epoch_whose_batches_all_ran(tmp_path, first, then, expected):
    """Reference: global_step / 4 updates an epoch (accumulation 1), rounded down. A resume from a
    checkpoint written at the last batch of an epoch (on_train_batch_end) takes Lightning's restart
    path that never counts the next epoch as started, and a finished fit's resume leaves that
    batch counted processed, not completed."""
    result = _fit(tmp_path, **first)
    if then is not None:
        result = _fit(tmp_path, ckpt_path=tmp_path / "last.ckpt", **then)
    assert result == expected and result[0] == result[1] // 4


@pytest.mark.parametrize("first,then,expected", [
    (3, 6, (1, 6)), (1, 3, (0, 3)), (3, 10, (2, 10)), (4, 5, (1, 5)), (6, 7, (1, 7)), (2, 2, (0, 2)),
])
def test_full_epochs_after_resuming_a_fit_that_max_steps_ended(tmp_path, first, then, expected):
    """A longer max_steps resumed from the last checkpoint of a fit that max_steps ended (mid-epoch or
    not): Lightning counts the resumed epoch processed a second time, and the epoch counters read 1 full
    epoch at update 6 of an epoch of 264. Reference: global_step // 4 updates an epoch."""
    steps = {"max_epochs": -1, "every_n_train_steps": None}
    _fit(tmp_path, max_steps=first, **steps)
    result = _fit(tmp_path, ckpt_path=tmp_path / "last.ckpt", max_steps=then, **steps)
    assert result == expected and result[0] == result[1] // 4


@pytest.mark.parametrize("first,then,expected", [
    (4, 2, (3, 10)),  # epochs 0 and 1 of 4 batches, then epoch 2 of 2
    (2, 4, (3, 8)),  # epochs 0 and 1 of 2 batches, then epoch 2 of 4
])
def test_full_epochs_after_a_resume_that_changes_the_batches_an_epoch(tmp_path, first, then, expected):
    """limit_train_batches changed on a resume from the end of epoch 2 (of max_epochs 3): the epochs are
    three, not the batches trained over this attempt's epoch size (10 // 2 = 5, 8 // 4 = 2)."""
    _fit(tmp_path, max_epochs=2, limit_train_batches=first, every_n_train_steps=None)
    result = _fit(tmp_path, ckpt_path=tmp_path / "last.ckpt", max_epochs=3, limit_train_batches=then,
                  every_n_train_steps=None)
    assert result == expected


def test_full_epochs_is_the_fits_after_testing_an_earlier_checkpoint(tmp_path):
    """run.train tests the best checkpoint after the fit, and test(ckpt_path=...) restores callback states
    too: the count read after it was the best epoch's (1 of 2 epochs when epoch 0 was best)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from peft_lightning.run import FullEpochs, full_epochs

    class Tested(_Tiny):
        def test_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        test_dataloader = _Tiny.train_dataloader

    every = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(callbacks=[every, FullEpochs()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=2)
    module = Tested()
    trainer.fit(module)
    trainer.test(module, ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)
    assert full_epochs(trainer) == 2 and trainer.global_step == 8


def test_a_run_folder_in_use_by_another_process_is_refused_before_anything_is_written(tmp_path):
    """A sweep relaunched while its first launch still runs, or one resume started twice: two processes
    in one folder would interleave results.json, checkpoints and logs with exit 0. The second stops with
    one line naming the process that holds the folder, and writes nothing; a killed holder's claim dies
    with it (no stale lock to clear by hand)."""
    from peft_lightning.faults import RUN_LOCK, hold_run_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"status": "running"}')
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from peft_lightning.faults import "
                               "hold_run_folder; hold_run_folder(sys.argv[1]); print('held', flush=True); "
                               "time.sleep(600)", str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc, results = run(out)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {out} is in use by another run (pid {holder.pid} on "), last
        assert results == {"status": "running"}  # untouched
        # (Hydra's own record of the attempt and its log line are all that is added, before the run starts)
        assert sorted(p.name for p in out.iterdir()) == [".hydra", RUN_LOCK, "results.json", "train.log"]
    finally:
        holder.kill()
        holder.wait()
    release = hold_run_folder(out)  # the SIGKILLed holder left the file, not the claim
    release()
    release = hold_run_folder(out)  # and a released claim is free again in the same process
    release()


def _held_elsewhere(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder` (as a sweep's first launch still running that job)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from peft_lightning.faults import "
                               "hold_run_folder; hold_run_folder(sys.argv[1]); print('held', flush=True); "
                               "time.sleep(600)", str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _train_here(out: Path, *overrides):
    """train() in this process (as the tests and a notebook call it), in `out`; bad batch size: it stops
    in validate_config, inside the run, before any model is loaded."""
    from omegaconf import open_dict

    from peft_lightning.run import train

    cfg = compose_cfg(["model=tiny-bert", "logger=csv", "data.batch_size=0", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return train(cfg)


def test_the_run_folder_is_free_again_however_train_ends(tmp_path, monkeypatch):
    """A failure before train()'s own try block (here: reading the overrides) left the folder held by this
    process for good: the next train() in it, in the same process, was refused as `in use by another run`
    naming this very process."""
    from peft_lightning import run as run_module
    from peft_lightning.faults import hold_run_folder

    with pytest.raises(ConfigError, match="data.batch_size"):  # a failure inside the run
        _train_here(tmp_path)
    hold_run_folder(tmp_path)()

    def broken(everything=False):
        raise RuntimeError("overrides unreadable")

    monkeypatch.setattr(run_module, "job_overrides", broken)
    with pytest.raises(RuntimeError, match="overrides unreadable"):  # a failure before it
        _train_here(tmp_path)
    hold_run_folder(tmp_path)()


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe{not json"])
def test_a_foreign_results_json_is_kept_as_text_not_a_crash(tmp_path, content):
    """A results.json that is not a run's record (a list; bytes that are not UTF-8) crashed train() with a
    traceback (TypeError / UnicodeDecodeError) before the run began; it is kept as text, as unparsable JSON is."""
    (tmp_path / "results.json").write_bytes(content)
    with pytest.raises(ConfigError, match="data.batch_size"):
        _train_here(tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["previous_attempts"] == [{"unreadable_results_json": content.decode(errors="replace")}]


def test_another_machines_main_process_does_not_claim_the_folder(tmp_path, monkeypatch):
    """Several machines without SLURM (README: NODE_RANK, MASTER_ADDR on each): the main process of machine
    1 has no RANK / LOCAL_RANK, so Lightning's rank says 0 before the trainer exists. It claimed the shared
    run folder that rank 0 of machine 0 holds (flock is cluster-wide on NFS) and stopped with `in use`,
    leaving machine 0 waiting for it; it must neither claim the folder nor write results.json."""
    from peft_lightning.faults import hold_run_folder

    release = hold_run_folder(tmp_path)  # global rank 0, on machine 0
    try:
        monkeypatch.setenv("NODE_RANK", "1")
        with pytest.raises(ConfigError, match="data.batch_size"):  # its own run, not OutputError
            _train_here(tmp_path)
        assert not (tmp_path / "results.json").exists()
    finally:
        release()


def test_a_filesystem_without_flock_runs_unguarded_not_refused(tmp_path, monkeypatch, caplog):
    """Lustre mounted without `-o flock` answers flock with ENOSYS: no process holds the folder, yet every
    run there was refused as `in use by another run (unknown process)`."""
    import errno
    import fcntl

    from peft_lightning.faults import hold_run_folder

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level("WARNING"):
        hold_run_folder(tmp_path)()
    assert "this filesystem has no flock" in caplog.text


def test_a_ddp_job_of_a_relaunched_sweep_whose_folder_is_in_use_fails_with_one_line(tmp_path):
    """A DDP job of a sweep runs in its own process (multirun.py). Refused there (its folder still held by
    the first launch), the sweep ended with a traceback: `RuntimeError: job 0 (...) exited with 2; see
    job.log` (empty) and exit 1. The child's one line is the sweep's, exit 2, and nothing is written."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)  # the first launch's job, still running
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in [*SMALL, *ddp]))
    (job / "results.json").write_text('{"status": "running"}')
    holder = _held_elsewhere(job)
    try:
        proc = subprocess.run([sys.executable, "train.py", "-m", *SMALL, *ddp, f"hydra.sweep.dir={tmp_path}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {job} is in use by another run (pid {holder.pid} on "), last
    assert json.loads((job / "results.json").read_text()) == {"status": "running"}
