"""W&B as a sweep needs it, read back from the offline runs' own record files: the sweep is the
group, job_type says train/eval, the summary holds the best dev value, the config is flat."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from peft_lightning.loggers import resume_id

ROOT = Path(__file__).resolve().parents[1]


def wandb_records(path: Path):
    """The records of a `run-<id>.wandb` file: W&B's LevelDB-style log (a 7-byte file header
    ":W&B", 0xBEE1, version; 32 KiB blocks of chunks, each with a 7-byte header: CRC, length, type
    full/first/middle/last) of `wandb_internal_pb2.Record` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def read_offline_run(folder: Path) -> dict:
    """group, job_type, config, summary (the last value of each key) and history of an offline run."""
    (file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    return read_wandb_file(file)


def read_wandb_file(file: Path) -> dict:
    """What read_offline_run reads, plus the run id, start time and exit code, of one `.wandb` file."""
    run = {"config": {}, "summary": {}, "history": []}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "exit":
            run["exit_code"] = record.exit.exit_code
            continue
        if kind == "run":
            run["group"], run["job_type"] = record.run.run_group, record.run.job_type
            run["id"], run["start"] = record.run.run_id, record.run.start_time.ToDatetime()
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
            continue
        elif kind == "history":
            run["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
            continue
        else:
            continue
        run["config"].update({u.key: json.loads(u.value_json) for u in updates})
    return run


def test_offline_runs_of_a_sweep_share_its_group_with_flat_config_and_best_dev_in_summary(tmp_path):
    # seed 2, lr 0.3: dev accuracy 0.516, 0.484, 0.484 (the best is not the last);
    # max_epochs=0: a run that trains nothing (eval)
    sweep = tmp_path / "depth_sweep"
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "model=tiny-bert", "logger=wandb", "trainer.max_epochs=3,0",
         "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=1",
         "data.batch_size=8", "data.max_length=32", "method.optim.lr=0.3", "seed=2", "method.prefix_length=8",
         "task_name=depth", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, evaluate = read_offline_run(sweep / "0"), read_offline_run(sweep / "1")
    results = json.loads((sweep / "0" / "results.json").read_text())

    assert train["group"] == evaluate["group"] == "depth:depth_sweep"  # the sweep, not task_name alone
    assert (train["job_type"], evaluate["job_type"]) == ("train", "eval")

    dev = [h["val/acc"] for h in train["history"] if "val/acc" in h]
    loss = [h["val/loss"] for h in train["history"] if "val/loss" in h]
    assert len(dev) == 3 and max(dev) != dev[-1]  # else the case shows nothing
    assert train["summary"]["val/acc"] == {"max": max(dev)} == {"max": results["metrics"]["best"]["val/acc_best"]}
    assert train["summary"]["val/loss"] == {"min": min(loss)}

    config = train["config"]
    expected = {"method": "ptuning_v2", "backbone": "tiny-bert", "data": "rotten_tomatoes", "seed": 2, "lr": 0.3,
                "prefix_length": 8, "reparameterization": "none", "depth": "deep", "head": "linear",
                "backbone_dropout": False, "max_epochs": 3, "max_steps": -1, "batch_size": 8,
                "trainable": results["parameters"]["trainable"],
                "trainable_pct": results["parameters"]["trainable_pct"],
                # every knob under its command-line name
                "method.prefix_length": 8, "method.optim.lr": 0.3, "method.head.dropout": 0.1,
                "trainer.max_epochs": 3, "data.max_length": 32, "model.config.hidden_size": 32, "task_name": "depth"}
    assert {k: config.get(k) for k in expected} == expected
    assert not [k for k, v in config.items() if isinstance(v, dict) and k != "_wandb"]  # flat: no nested values
    assert evaluate["config"]["max_epochs"] == 0


def test_a_resumed_run_is_one_wandb_run_whose_summary_keeps_the_best_dev_of_both_attempts(tmp_path):
    """SIGTERM, then resume in the run's folder: the attempt continues the W&B run results.json
    recorded (offline: a second offline-run-<time>-<id> folder under the same id, which `wandb sync`
    uploads after the first into the one run), and the run's last summary holds the best dev value
    of both attempts, though it came before the interrupt."""
    # as above (seed 2, lr 0.3): the best dev accuracy is epoch 0's; the SIGTERM comes at step 5, in epoch 1
    small = ["model=tiny-bert", "logger=wandb", "trainer.max_epochs=3", "+trainer.limit_train_batches=4",
             "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=1", "data.batch_size=8",
             "data.max_length=32", "method.optim.lr=0.3", "seed=2", "method.prefix_length=8"]
    out, env = tmp_path / "run", {**os.environ, "WANDB_MODE": "offline"}

    def train(*overrides):
        return subprocess.run([sys.executable, "train.py", *small, f"hydra.run.dir={out}", *overrides], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)

    first = train("+callbacks.fault._target_=peft_lightning.faults.FaultInjection", "+callbacks.fault.signal_at_step=5")
    assert first.returncode == 143, first.stderr[-3000:]
    interrupted = json.loads((out / "results.json").read_text())
    assert interrupted["status"] == "interrupted"
    second = train(f"ckpt_path={interrupted['resume_from']}")
    assert second.returncode == 0, second.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"

    runs = sorted((read_wandb_file(f) for f in out.glob("wandb/offline-run-*/run-*.wandb")), key=lambda r: r["start"])
    # one W&B run: both attempts' files (folders offline-run-<time>-<id>) carry the id results.json recorded
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    assert {f.name.rsplit("-", 1)[1] for f in out.glob("wandb/offline-run-*")} == {runs[0]["id"]}
    assert interrupted.get("wandb_run_id") == results.get("wandb_run_id") == runs[0]["id"]
    assert [r["exit_code"] for r in runs] == [1, 0]  # synced oldest first, the run ends finished
    assert runs[0]["group"] == runs[1]["group"]

    before, after = ([h["val/acc"] for h in r["history"] if "val/acc" in h] for r in runs)
    assert len(before) == 1 and len(after) == 2 and max(before) > max(after)  # else the case shows nothing
    best = results["metrics"]["best"]["val/acc_best"]
    assert runs[1]["summary"]["val/acc"] == {"max": max(before + after)} == {"max": best}
    assert runs[0]["summary"]["val/acc"] == {"max": max(before)}


def test_an_attempt_continues_the_newest_recorded_wandb_run():
    assert resume_id({"status": "running"}) is None  # a first attempt: a new run
    assert resume_id({"previous_attempts": [{"wandb_run_id": "a1"}, {"wandb_run_id": "b2"}]}) == "b2"
    # the last attempt was killed before its logger started: the run before it goes on
    assert resume_id({"previous_attempts": [{"wandb_run_id": "a1"}, {"status": "running"}]}) == "a1"
