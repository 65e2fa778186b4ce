"""Multi-task prompt training: mixed-task batches on one backbone, per-task evaluation and adapters."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_batch, save_word_tokenizer, tiny_model
from omegaconf import open_dict
from safetensors.torch import load_file
from test_configs import compose_cfg

from peft_lightning.checkpoint import load_pretrained
from peft_lightning.errors import ConfigError
from peft_lightning.multitask import MultiTaskPrompts, TaskMixSampler, task_probabilities
from peft_lightning.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]
METHOD = dict(name="ptuning_v2", prefix_length=4, depth="deep", reparameterization="none", prefix_dropout=0.0,
              head={"dropout": 0.0}, optim={"lr": 1e-2})
TASKS = {"sentiment": {"labels": ["neg", "pos"]}, "topic": {"labels": ["a", "b", "c"]}}


# --- sampling -------------------------------------------------------------------------------------
def test_sampling_probabilities_by_value():
    assert task_probabilities([100, 400], "proportional") == pytest.approx([0.2, 0.8], abs=1e-12)
    # p_i ~ n_i^(1/T): T = 2 takes square roots (10, 20), T = 3 cube roots (1, 2, 3)
    assert task_probabilities([100, 400], "temperature", 2) == pytest.approx([1 / 3, 2 / 3], abs=1e-12)
    assert task_probabilities([1, 8, 27], "temperature", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=1e-12)
    assert task_probabilities([100, 400], "temperature", 1) == pytest.approx([0.2, 0.8], abs=1e-12)
    assert task_probabilities([100, 400], "temperature", 1e9) == pytest.approx([0.5, 0.5], abs=1e-6)
    assert task_probabilities([100, 400], "proportional", 5) == pytest.approx([0.2, 0.8], abs=1e-12)  # (T unused)


def test_sampler_draws_tasks_by_their_probabilities_and_each_tasks_examples_evenly():
    sizes = [300, 2700]
    probs = task_probabilities(sizes, "temperature", 2)  # sqrt: 17.3 / 52.0 -> 0.25 / 0.75
    assert probs == pytest.approx([0.25, 0.75])
    sampler = TaskMixSampler(sizes, probs, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 3000
    share = sum(i < 300 for i in order) / len(order)
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 3000), share
    # a task's examples come in shuffled passes: drawn ~750 times, each of its 300 examples 2 or 3 times
    counts = torch.bincount(torch.tensor([i for i in order if i < 300]), minlength=300)
    assert counts.max() - counts.min() <= 1
    assert list(sampler) == order  # a function of (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != order
    resumed = TaskMixSampler(sizes, probs, seed=3, resume=lambda epoch: 64)
    assert list(resumed) == order[64:]


# --- the module -----------------------------------------------------------------------------------
def module(**method):
    torch.manual_seed(0)
    return MultiTaskPrompts(tiny_model("bert"), {**METHOD, **method}, TASKS)


def mixed_batch(seed=0, task_ids=(0, 1, 1, 0, 1, 0)):
    batch = make_batch(batch=len(task_ids), seed=seed)
    batch["task_ids"] = torch.tensor(task_ids)
    batch["labels"] = torch.tensor([i % (2 + t) for i, t in enumerate(task_ids)])
    return batch


def test_one_backbone_for_all_tasks_each_with_its_own_prefix_and_head():
    m = module()
    a, b = m.members["sentiment"], m.members["topic"]
    assert a.backbone is b.backbone and a.prefix is not b.prefix and a.head is not b.head
    assert not torch.equal(a.prefix.kv(), b.prefix.kv())
    per_task = sum(p.numel() for p in a.parameters() if p.requires_grad)
    head_b = 32 * 3 + 3
    assert m.parameter_counts()["trainable"] == per_task + (per_task - (32 * 2 + 2)) + head_b


def test_mixed_batch_rows_equal_each_task_run_alone():
    m = module().eval()
    batch = mixed_batch()
    with torch.no_grad():
        out = m.mixed_logits(batch)
        alone = {name: m.members[name](batch) for name in TASKS}  # every row with one task's prefix
    assert sorted(name for name, _, _ in out) == ["sentiment", "topic"]
    for name, index, logits in out:
        assert index.tolist() == [i for i, t in enumerate(batch["task_ids"].tolist()) if t == list(TASKS).index(name)]
        torch.testing.assert_close(logits, alone[name][index], atol=1e-5, rtol=1e-5)


def test_a_tasks_gradients_never_reach_another_tasks_prefix_or_head():
    m = module().train()
    sentiment_only = mixed_batch(task_ids=(0, 0, 0))
    m.mixed_loss(sentiment_only).backward()
    a, b = m.members["sentiment"], m.members["topic"]
    assert all(p.grad is None for p in b.parameters() if p.requires_grad)  # not even zeros (Adam's moments stay)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters() if p.requires_grad)
    # in a mixed batch, the topic rows' loss alone gives the topic task's gradients (weighted by its share)
    m.zero_grad(set_to_none=True)
    batch = mixed_batch(seed=1)
    m.mixed_loss(batch).backward()
    mixed = {n: p.grad.clone() for n, p in b.named_parameters() if p.requires_grad}
    rows = (batch["task_ids"] == 1).nonzero().squeeze(1)
    alone = {k: v[rows] for k, v in batch.items()}
    grads = torch.autograd.grad(m.mixed_loss(alone) * len(rows) / len(batch["labels"]),
                                [p for p in b.parameters() if p.requires_grad])
    for (name, g), ref in zip(mixed.items(), grads):
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_with_another_task_list_is_a_checkpoint_error():
    """A checkpoint of other tasks: refused by name (exit 2), not a KeyError traceback; one that holds a
    task this run lacks is refused too (its tensors and best state would be dropped without a word)."""
    from peft_lightning.errors import CheckpointError

    def checkpoint(m):
        return {"state_dict": {f"members.{n}.{k}": v for n, member in m.members.items()
                               for k, v in member.trainable_state_dict().items()}}

    saved = checkpoint(module())
    module().on_load_checkpoint(saved)  # the run's own task list: loads
    torch.manual_seed(0)
    renamed = MultiTaskPrompts(tiny_model("bert"), METHOD, {"sentiment": TASKS["sentiment"], "spam": TASKS["topic"]})
    with pytest.raises(CheckpointError, match=r"^checkpoint lacks trainable tensors \['members.spam.head.linear.bias'"):
        renamed.on_load_checkpoint(saved)
    torch.manual_seed(0)
    fewer = MultiTaskPrompts(tiny_model("bert"), METHOD, {"sentiment": TASKS["sentiment"], "x": TASKS["sentiment"]})
    with pytest.raises(CheckpointError, match=r"^checkpoint holds tensors this run does not train \['members.topic."):
        fewer.on_load_checkpoint({"state_dict": {**saved["state_dict"], **checkpoint(fewer)["state_dict"]}})


def test_gradient_clipping_is_per_task():
    m = module()
    a, b = m.members["sentiment"], m.members["topic"]
    for p in a.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 10.0)
    small = {}
    for n, p in b.named_parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 1e-4)
            small[n] = p.grad.clone()
    m.configure_gradient_clipping(None, 1.0, "norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in a.parameters() if p.requires_grad]))
    assert abs(norm.item() - 1.0) < 1e-4  # clipped on its own norm
    assert all(torch.equal(p.grad, small[n]) for n, p in b.named_parameters() if p.requires_grad)  # untouched


# --- a whole run ----------------------------------------------------------------------------------
WORDS = ["good", "great", "bad", "awful", "film", "plot", "cars", "food", "music", "the", "a", "very"]


def write_task(path, labels, rows=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(rows):
        label = i % len(labels)
        words = [WORDS[int(j)] for j in torch.randint(4, len(WORDS), (5,), generator=g)]
        words.insert(int(torch.randint(0, 5, (1,), generator=g)), WORDS[label + (0 if len(labels) == 2 else 4)])
        lines.append(json.dumps({"text": " ".join(words) + f" {i}", "label": labels[label]}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def two_task_config(tmp_path, *overrides):
    # numbers in the texts keep them distinct (deduplication); the tokenizer knows the words and 0..59
    tokenizer = save_word_tokenizer(tmp_path / "tok", WORDS + [str(i) for i in range(60)])
    cfg = compose_cfg(["data=multitask", "logger=csv", "callbacks=default", "trainer.max_epochs=3", "data.batch_size=8",
                       "data.max_length=24", "method.prefix_length=4", "method.optim.lr=0.05", *overrides])
    with open_dict(cfg):
        cfg.model = {"name": "tiny", "config": {**TINY["bert"], "vocab_size": 99}, "tokenizer": tokenizer,
                     "attn_implementation": "sdpa"}
        cfg.data.tasks = [
            {"name": "sentiment", "source": write_task(tmp_path / "s.jsonl", ["neg", "pos"]), "labels": ["neg", "pos"]},
            {"name": "topic", "source": write_task(tmp_path / "t.jsonl", ["x", "y", "z"], seed=1),
             "labels": ["x", "y", "z"], "metric": "f1"}]
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def test_a_step_budget_warning_knows_a_multitask_run_selects_each_tasks_best_without_callbacks(tmp_path, caplog):
    """A multi-task run selects each task's best dev state itself (task_best), callbacks=none too: what is
    tested and exported is from the last validated update, not the last model (as train's own warning
    says after the fit)."""
    from peft_lightning.validation import validate_config

    cfg = two_task_config(tmp_path, "callbacks=none", "trainer.max_epochs=-1", "+trainer.max_steps=10",
                          "+trainer.check_val_every_n_epoch=null", "+trainer.val_check_interval=4")
    with caplog.at_level("WARNING", logger="peft_lightning.validation"):
        validate_config(cfg)
    found = [r.getMessage() for r in caplog.records if "val_check_interval" in r.getMessage()]
    assert len(found) == 1 and "the last 2 updates after update 8 are never validated, and the checkpoint tested " \
        "and exported is from update 8 at the latest" in found[0], found


def test_two_task_run_exports_adapters_that_serving_and_predict_load_as_the_run_had_them(tmp_path, monkeypatch):
    from peft_lightning.predict import predict_records
    from peft_lightning.run import train
    from peft_lightning.serving import MultiTaskModel

    seen = {}
    save, use_best = MultiTaskPrompts.save_adapters, MultiTaskPrompts.use_task_best

    def spy(self, folder):
        seen["module"] = self
        return save(self, folder)

    def last_then_best(self):
        seen["last"] = {n: {k: v.clone() for k, v in m.trainable_state_dict().items()} for n, m in self.members.items()}
        use_best(self)

    monkeypatch.setattr(MultiTaskPrompts, "save_adapters", spy)
    monkeypatch.setattr(MultiTaskPrompts, "use_task_best", last_then_best)
    summary = train(two_task_config(tmp_path))
    assert summary["status"] == "completed"
    run = seen["module"].eval()
    test = summary["metrics"]["test"]
    assert {"test/sentiment/acc", "test/topic/f1", "test/mean"} <= set(test)
    assert test["test/mean"] == pytest.approx((test["test/sentiment/acc"] + test["test/topic/f1"]) / 2)
    assert set(summary["task_best"]) == {"sentiment", "topic"} and "val/f1" in summary["task_best"]["topic"]
    # each task's own best: its epoch and update (dev at each epoch end), not the best mean's checkpoint
    assert summary["selection"].startswith("each task's best dev state")
    per_epoch = summary["global_step"] // summary["epochs_completed"]
    assert per_epoch * summary["epochs_completed"] == summary["global_step"]
    for name, best in summary["task_best"].items():
        assert best["step"] == (best["epoch"] + 1) * per_epoch, (name, best)
    adapters = summary["adapters"]
    assert sorted(adapters) == ["sentiment", "topic"]
    for name, folder in adapters.items():  # each adapter holds its task's best-dev state
        saved = load_file(str(Path(folder) / "adapter_model.safetensors"))
        best = run.task_best[name]["state"]
        assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
        if summary["task_best"][name]["epoch"] < summary["epochs_completed"] - 1:  # not the last state
            assert not all(torch.equal(saved[k], seen["last"][name][k]) for k in saved)
    records = [{"text": "good film 3"}, {"text": "awful plot very 17"}, {"text": "cars music 40"}]
    tokenizer = run.members["sentiment"].tokenizer
    batch = run.members["sentiment"].task.collator(tokenizer)(
        [tokenizer(r["text"]) for r in records])
    with torch.no_grad():
        in_run = {name: run.members[name](batch) for name in adapters}
    for name, folder in adapters.items():  # single-task: load_pretrained and predict
        alone = load_pretrained(folder)
        with torch.no_grad():
            assert torch.equal(alone(batch), in_run[name])
        probs = [list(r["probabilities"].values()) for r in predict_records(alone, records)]
        torch.testing.assert_close(torch.tensor(probs), in_run[name].softmax(-1), atol=1e-6, rtol=0)
    served = MultiTaskModel(adapters)  # both tasks in one batch
    out = served(batch, ["topic", "sentiment", "topic"])
    for row, name in enumerate(["topic", "sentiment", "topic"]):
        torch.testing.assert_close(out[row], in_run[name][row], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("override,selection", [
    # no dev: no task has a best state, each is tested and exported as last trained
    ("+trainer.limit_val_batches=0", "last (no validation ran)"),
    # no checkpoint callback: each task's best state is still kept (by the module), but there is no
    # best_checkpoint of the best val/mean to speak of
    ("callbacks=none", "each task's best dev state (task_best)"),
])
def test_a_multitask_runs_selection_says_what_was_tested(override, selection, tmp_path):
    from peft_lightning.run import train

    summary = train(two_task_config(tmp_path, "trainer.max_epochs=1", override))
    assert summary["status"] == "completed" and summary["global_step"] > 0
    assert summary["selection"] == selection and summary["best_checkpoint"] == ""
    assert set(summary["task_best"]) == (set() if "limit_val" in override else {"sentiment", "topic"})
    assert "unvalidated_updates" not in summary  # (no validation at all: not a count of updates after one)


def test_overfit_batches_overfit_a_mix_of_tasks(tmp_path):
    """trainer.overfit_batches (debug=overfit): Lightning swaps a shuffling sampler for a sequential one
    over the dataset, here the tasks end to end: the fixed batches held the first task's rows alone,
    and the other tasks were never trained. They are the first batches of epoch 0's mixed order."""
    from types import SimpleNamespace

    from torch.utils.data import SequentialSampler

    from peft_lightning.backbone import BackboneSpec, load_tokenizer
    from peft_lightning.multitask import build

    cfg = two_task_config(tmp_path)
    model = {k: v for k, v in cfg.model.items() if k != "name"}
    datamodule, _ = build(cfg, load_tokenizer(BackboneSpec(**model)))
    datamodule.setup("fit")
    mixed = next(iter(datamodule.train_dataloader()))
    datamodule.trainer = SimpleNamespace(overfit_batches=2, world_size=1)
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, SequentialSampler)  # (Lightning keeps it as it is)
    first = next(iter(loader))
    assert set(first["task_ids"].tolist()) == {0, 1}
    assert all(torch.equal(first[k], mixed[k]) for k in mixed)


@pytest.mark.parametrize("overrides,message", [
    (["data.tasks=[rotten_tomatoes]"], r"data.tasks lists one task \(rotten_tomatoes\); a single-task run is "
                                        r"data=rotten_tomatoes"),
    (["data.tasks=[rotten_tomatoes,nope]"], r"data.tasks\[1\]='nope': no data config conf/data/nope.yaml"),
    (["data.tasks=[rotten_tomatoes,rotten_tomatoes]"], "names 'rotten_tomatoes' twice"),
    (["data.sampling=uniform"], r"data.sampling must be one of \('proportional', 'temperature'\)"),
    (["data.temperature=0"], "data.temperature must be a positive number"),
    (["method=lora"], "method must be one of .*ptuning_v2.*got method=lora"),
    (["method.depth=embedding"], "with method.depth deep or a layer list"),
    (["method.head.type=verbalizer"], "method.head.type must be linear"),
    (["data.tasks=[rotten_tomatoes,rotten_tomatoes_scores]"],
     "data.tasks.rotten_tomatoes_scores: data.task=regression"),
    (["data.tasks=[rotten_tomatoes,{name:sms_spam,trian_examples:5}]"],
     r"unknown key data.tasks.sms_spam.trian_examples \(did you mean data.tasks.sms_spam.train_examples\?\)"),
    (["data.tasks=[rotten_tomatoes,{name:sms_spam,train_examples:0}]"],
     "data.tasks.sms_spam.train_examples must be a positive count"),
    (["trainer=ddp"], "set trainer.strategy.find_unused_parameters=true"),
    # keys a task entry may not set: the run reads them once for every task (a silent no-op otherwise)
    (["data.tasks=[rotten_tomatoes,{name:sms_spam,max_length:16}]"],
     r"^data.tasks.sms_spam.max_length: the run's data.max_length applies to every task; set data.max_length"),
    (["data.tasks=[{name:rotten_tomatoes,batch_size:4},sms_spam]"],
     r"^data.tasks.rotten_tomatoes.batch_size: the run's data.batch_size applies to every task"),
    (["data.tasks=[rotten_tomatoes,{name:sms_spam,group_by_length:false}]"],
     r"^data.tasks.sms_spam.group_by_length: not used in a multi-task run \(training batches mix tasks"),
    (["data.tasks=[rotten_tomatoes,{name:sms_spam,extra_eval:{x:{source:'embedded:sms_spam'}}}]"],
     r"^data.tasks.sms_spam.extra_eval: not used in a multi-task run"),
])
def test_multitask_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_config(compose_cfg(["data=multitask", *overrides]))
    assert "\n" not in str(err.value)


@pytest.mark.slow  # ~50 s on 2 shared cores (two embedded sets, two processes): .ci/run runs it
def test_train_py_two_tasks_on_the_embedded_tasks(tmp_path):
    """`python train.py data=multitask` (rotten_tomatoes + sms_spam, tiny budget), then predict with one
    task's adapter from the command line."""
    proc = subprocess.run(
        [sys.executable, "train.py", "data=multitask", "model=tiny-bert", "debug=limit", "trainer.max_epochs=1",
         "logger=wandb", "data.tasks=[{name:rotten_tomatoes,train_examples:64},{name:sms_spam,train_examples:64}]",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and sorted(results["adapters"]) == ["rotten_tomatoes", "sms_spam"]
    assert {"val/rotten_tomatoes/acc", "val/sms_spam/f1", "val/mean"} <= set(results["metrics"]["final"])
    assert list((tmp_path / "checkpoints").glob("epoch00-mean*.ckpt"))
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # W&B selects by val/mean too
    out = subprocess.run([sys.executable, "-m", "peft_lightning.predict", results["adapters"]["sms_spam"]], cwd=ROOT,
                         input="WINNER! claim your free prize now\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["label"] in ("ham", "spam")


def test_resume_from_a_checkpoint_finishes_like_the_straight_run(tmp_path):
    """The checkpoint holds every task's tensors, Adam moments (the key/value tables' flat) and best
    states; the mixed order is a function of (seed, epoch): resuming after epoch 0 ends bit for bit
    where the straight run ends, each task's best state included."""
    import shutil

    from peft_lightning.run import train

    straight = train(two_task_config(tmp_path / "a", "trainer.max_epochs=2"))
    first = next((tmp_path / "a" / "run" / "checkpoints").glob("epoch00-*.ckpt"))
    resumed_dir = tmp_path / "b" / "run" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copy(first, resumed_dir / first.name)
    cfg = two_task_config(tmp_path / "b", "trainer.max_epochs=2")
    with open_dict(cfg):
        cfg.ckpt_path = str(resumed_dir / first.name)
    resumed = train(cfg)
    assert resumed["global_step"] == straight["global_step"] > 0
    for part in ("final", "test"):
        assert resumed["metrics"][part] == straight["metrics"][part], part
    assert resumed["task_best"] == straight["task_best"]
    for name, folder in straight["adapters"].items():
        a, b = (load_file(str(Path(f) / "adapter_model.safetensors")) for f in (folder, resumed["adapters"][name]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
