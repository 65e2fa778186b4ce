"""Prompt transfer (SPoT): method.init=adapter starts a prompt method from another run's saved prompt."""
import shutil

import pytest
import torch
from conftest import make_batch, tiny_model, train_steps
from safetensors.torch import load_file

from peft_lightning.checkpoint import load_pretrained, save_pretrained
from peft_lightning.errors import ConfigError
from peft_lightning.methods import METHODS

BASE = dict(prefix_length=4, depth="deep", reparameterization="none", reparam_hidden=16, prefix_dropout=0.0,
            head={"dropout": 0.0})


def build(name, labels=("neg", "pos"), arch="bert", seed=0, **method):
    torch.manual_seed(seed)  # the backbone is drawn first: one seed, one random backbone (a real one: its weights)
    return METHODS[name](model=tiny_model(arch), method={**BASE, "name": name, **method}, num_labels=len(labels),
                         labels=list(labels))


def source(tmp_path, name="ptuning_v2", **method):
    m = build(name, labels=("ham", "spam", "other"), **method)
    batch = make_batch(seed=1)
    train_steps(m, [batch], 3)
    return m.eval(), save_pretrained(m, tmp_path / f"source-{name}")


def target(folder, name="ptuning_v2", **method):
    return build(name, init="adapter", init_from=str(folder), **method).eval()


def flat(m):
    with torch.no_grad():
        return m.prompt_encoder().detach().clone()


CASES = {  # source settings, target settings, the source tensor the target starts from (None: computed)
    "free table": (dict(), dict(), "prefix.encoder.embedding.weight"),
    "MLP ejected at export": (dict(name="prefix_tuning", reparameterization="mlp", eject_on_export=True), dict(),
                              "prefix.encoder.embedding.weight"),
    "MLP kept, run here": (dict(name="prefix_tuning", reparameterization="mlp", eject_on_export=False), dict(), None),
    "layer list": (dict(depth=[1, 2]), dict(depth=[1, 2]), "prefix.encoder.embedding.weight"),
    "input prompt": (dict(name="prompt_tuning", depth="embedding"), dict(name="prompt_tuning", depth="embedding"),
                     "prompt.embedding.weight"),
    "LSTM kept, into a free input prompt": (dict(name="p_tuning", depth="embedding", reparameterization="lstm"),
                                            dict(name="prompt_tuning", depth="embedding"), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_target_starts_from_the_sources_saved_prompt(tmp_path, case):
    src_cfg, tgt_cfg, key = CASES[case]
    src, folder = source(tmp_path, **src_cfg)
    tgt = target(folder, **tgt_cfg)
    if key is not None:  # the saved (ejected) table, bit for bit
        assert torch.equal(flat(tgt), load_file(str(folder / "adapter_model.safetensors"))[key])
    else:  # the network the source kept, run once: what the reloaded source computes, bit for bit
        assert torch.equal(flat(tgt), flat(load_pretrained(folder)))
    fresh = build(tgt_cfg.get("name", "ptuning_v2"), **{k: v for k, v in tgt_cfg.items() if k != "name"})
    assert not torch.allclose(flat(tgt), flat(fresh))  # (not a random start that happens to agree)
    # the head is not transferred: the target's has its own labels (2 here, the source's 3)
    assert tgt.head.linear.weight.shape[0] == 2 and src.head.linear.weight.shape[0] == 3
    # the prompt is the source's in function too: with the source's head the target computes its logits
    both = build(tgt_cfg.get("name", "ptuning_v2"), labels=("ham", "spam", "other"), init="adapter",
                 init_from=str(folder), **{k: v for k, v in tgt_cfg.items() if k != "name"}).eval()
    both.head.load_state_dict(src.head.state_dict())
    batch = make_batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(both(batch), src(batch), rtol=1e-6, atol=1e-6)


def test_reparameterized_target_continues_the_sources_network(tmp_path):
    mlp = dict(name="prefix_tuning", reparameterization="mlp", eject_on_export=False)
    src, folder = source(tmp_path, **mlp)
    tgt = target(folder, **mlp)
    assert torch.equal(flat(tgt), flat(src))
    own, theirs = tgt.prefix.encoder.state_dict(), src.prefix.encoder.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)


MISMATCHES = {  # source settings, target settings (or its seed / arch), the error's words
    "prefix length": (dict(), dict(prefix_length=6),
                      r"has method.prefix_length=4, this run 6: set method.prefix_length=4"),
    "input prompt into deep": (dict(name="prompt_tuning", depth="embedding"), dict(),
                               r"holds an input-level prompt \(method.depth=embedding\), this run has deep prefixes"),
    "layers": (dict(depth=[1, 2]), dict(), r"prefixes in attention slots \[1, 2\].*this run in \[0, 1, 2\].*"
                                           r"set method.depth=\[1, 2\]"),
    "another backbone": (dict(), dict(arch="roberta"), r"was trained on model.config=.*'bert'.*this run uses "
                                                       r"model.config=.*'roberta'"),
    "another random draw": (dict(), dict(seed=1), r"with other weights than this run's \(another seed\?\)"),
    "ejected into a network": (dict(name="prefix_tuning", reparameterization="mlp", eject_on_export=True),
                               dict(name="prefix_tuning", reparameterization="mlp"),
                               r"reparameterizes its prompt \(method.reparameterization=mlp\) but .* holds a "
                               r"flat prompt"),
    "network width": (dict(name="prefix_tuning", reparameterization="mlp", eject_on_export=False),
                      dict(name="prefix_tuning", reparameterization="mlp", reparam_hidden=8),
                      r"has method.reparameterization=mlp, reparam_hidden=16; this run mlp, 8"),
    "not a prompt": (dict(name="lora"), dict(), r"holds a method=lora adapter; prompt transfer starts from a prompt"),
    "a gated prefix target": (dict(), dict(name="unipelt"), r"not method=unipelt"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatches_are_one_line_config_errors_naming_the_key(tmp_path, case):
    src_cfg, tgt_cfg, message = MISMATCHES[case]
    _, folder = source(tmp_path, **src_cfg)
    with pytest.raises(ConfigError, match=message) as err:
        target(folder, **tgt_cfg)
    assert "\n" not in str(err.value)
    if case != "a gated prefix target":  # (refused before the source is read)
        assert f"method.init_from={folder}" in str(err.value)


def test_missing_source_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"method.init_from=.*nowhere: no adapter_config.json there"):
        target(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="method.init=adapter needs method.init_from"):
        build("ptuning_v2", init="adapter")


def test_transferred_prompt_trains_and_its_adapter_stands_alone(tmp_path):
    _, folder = source(tmp_path)
    tgt = target(folder)
    start = flat(tgt)
    losses = train_steps(tgt, [make_batch(seed=4)], 3)
    assert all(torch.isfinite(torch.tensor(losses))) and not torch.equal(flat(tgt), start)
    saved = save_pretrained(tgt.eval(), tmp_path / "target")
    shutil.rmtree(folder)  # the target's adapter holds its trained prompt: loading never reads the source
    import json

    method = json.loads((saved / "adapter_config.json").read_text())["method"]
    assert method["init"] == "random" and "init_from" not in method
    again = load_pretrained(saved)
    batch = make_batch(seed=5)
    with torch.no_grad():
        assert torch.equal(again(batch), tgt(batch))


def test_config_checks_init_from(caplog):
    from test_configs import compose_cfg

    from peft_lightning.validation import validate_config

    with pytest.raises(ConfigError, match="method.init=adapter needs method.init_from"):
        validate_config(compose_cfg(["method.init=adapter"]))
    validate_config(compose_cfg(["method.init_from=somewhere/adapter"]))  # (a sweep's random arm)
    assert "method.init_from is read only with method.init=adapter" in caplog.text
    validate_config(compose_cfg(["+method.init_text=a review"]))  # (the same for init=text's words)
    assert "method.init_text is read only with method.init=text; this run starts from init=random" in caplog.text


@pytest.mark.slow  # two train.py runs, ~40 s on 2 shared cores: .ci/run runs it
def test_two_step_commands_on_the_embedded_tasks(tmp_path):
    """The documented two steps: a source run on SMS spam, then a low-data run on Rotten Tomatoes
    that starts from its prefix (tiny random BERT, one seed: the same backbone in both runs)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    small = ["model=tiny-bert", "debug=limit", "trainer.max_epochs=1", "logger=csv"]

    def train(*args):
        proc = subprocess.run([sys.executable, "train.py", *small, *args], cwd=root, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train("data=sms_spam", "data.train_examples=64", f"hydra.run.dir={tmp_path / 'source'}")
    train("method.init=adapter", f"method.init_from={tmp_path / 'source' / 'adapter'}",
                 "data.train_examples=64", f"hydra.run.dir={tmp_path / 'target'}")
    assert "method.init=adapter: the prefix of" in (tmp_path / "target" / "train.log").read_text()
    results = json.loads((tmp_path / "target" / "results.json").read_text())
    assert results["status"] == "completed" and "test/acc" in results["metrics"]["test"]


def test_low_data_sweeps_give_every_size_the_same_updates_and_dev_points(tmp_path):
    """sweeps/transfer.yaml and train_size.yaml budget updates, not epochs: 50 and 100 examples (2 and 4
    batches an epoch) both take the sweep's max_steps and are validated every val_check_interval steps
    across epoch ends. With a budget of epochs the 50-example job would take half the updates."""
    import csv
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    for name in ("transfer", "train_size"):
        trainer = yaml.safe_load((root / "sweeps" / f"{name}.yaml").read_text())["trainer"]
        assert trainer["max_steps"] > 0 and trainer["max_epochs"] == -1 and trainer["check_val_every_n_epoch"] is None
    proc = subprocess.run([sys.executable, "train.py", "-m", "+sweeps=transfer", "model=tiny-bert", "logger=csv",
                           "method.init=random", "seed=1", "data.train_examples=50,100", "trainer.max_steps=12",
                           "trainer.val_check_interval=4", "+trainer.limit_val_batches=1",
                           "+trainer.limit_test_batches=1", f"hydra.sweep.dir={tmp_path}"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        results = json.loads((tmp_path / job / "results.json").read_text())
        assert results["status"] == "completed" and results["global_step"] == 12
        rows = list(csv.DictReader(open(next((tmp_path / job / "csv").glob("*/metrics.csv")))))
        dev = {int(r["step"]) + 1: float(r["val/acc"]) for r in rows if r.get("val/acc")}
        assert list(dev) == [4, 8, 12]  # after updates 4, 8 and 12 (the csv logs the step before the increment)
        best = max(dev, key=lambda step: (dev[step], -step))  # (a tie: the first, as ModelCheckpoint keeps it)
        assert results["best_step"] == best and results["best_score"] == pytest.approx(dev[best])
    sizes = sorted(json.loads((tmp_path / j / "results.json").read_text())["epochs_completed"] for j in ("0", "1"))
    assert sizes == [3, 6]  # 12 updates: 3 epochs of 4 batches, 6 of 2
