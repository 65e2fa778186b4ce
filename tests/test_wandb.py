"""W&B as a sweep needs it, read back from the offline runs' own record files: the sweep is the
group, job_type says train/eval, the summary holds the best dev value, the config is flat."""
import json
import struct
import subprocess
import sys
from pathlib import Path

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
    run = {"config": {}, "summary": {}, "history": []}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["group"], run["job_type"] = record.run.run_group, record.run.job_type
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
                "backbone_dropout": False, "max_epochs": 3, "batch_size": 8,
                "trainable": results["parameters"]["trainable"],
                "trainable_pct": results["parameters"]["trainable_pct"],
                # every knob under its command-line name
                "method.prefix_length": 8, "method.optim.lr": 0.3, "method.head.dropout": 0.1,
                "trainer.max_epochs": 3, "data.max_length": 32, "model.config.hidden_size": 32, "task_name": "depth"}
    assert {k: config.get(k) for k in expected} == expected
    assert not [k for k, v in config.items() if isinstance(v, dict) and k != "_wandb"]  # flat: no nested values
    assert evaluate["config"]["max_epochs"] == 0
