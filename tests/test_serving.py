"""Many tasks on one frozen backbone, and prompt ensembling, against running each task alone."""
import pytest
import torch
from conftest import make_batch, tiny_model, train_steps

from peft_lightning.checkpoint import save_pretrained
from peft_lightning.methods import METHODS
from peft_lightning.serving import MultiTaskModel, ensemble


def trained(tmp_path, name, labels, seed, **method):
    torch.manual_seed(0)  # the same random backbone for every task (a real one is the same weights)
    cfg = dict(name=name, prefix_length=4, depth="deep", reparameterization="none", reparam_hidden=16,
               head={"dropout": 0.0})
    cfg.update(method)
    m = METHODS[name](model=tiny_model("bert"), method=cfg, num_labels=len(labels), labels=labels)
    torch.manual_seed(seed)
    batch = make_batch(seed=seed)
    batch["labels"] = batch["labels"] % len(labels)
    train_steps(m, [batch], 5)
    save_pretrained(m, tmp_path / f"{name}-{seed}")
    return m.eval(), tmp_path / f"{name}-{seed}"


def test_each_example_uses_its_own_tasks_prefix(tmp_path):
    a, dir_a = trained(tmp_path, "ptuning_v2", ["neg", "pos"], seed=1)
    b, dir_b = trained(tmp_path, "prefix_tuning", ["x", "y", "z"], seed=2, prefix_length=6, reparameterization="mlp")
    torch.manual_seed(0)
    served = MultiTaskModel({"a": dir_a, "b": dir_b})
    batch = make_batch(batch=6, seed=5)
    tasks = ["a", "b", "b", "a", "b", "a"]
    out = served(batch, tasks)
    with torch.no_grad():
        alone = {"a": a(batch), "b": b(batch)}  # every example with one task's prefix
    for row, task in enumerate(tasks):
        assert out[row].shape == (2 if task == "a" else 3,)
        torch.testing.assert_close(out[row], alone[task][row], atol=1e-5, rtol=1e-5)


def test_each_example_uses_its_own_tasks_ia3_vectors(tmp_path):
    """(IA)^3 tasks in one batch: every example's output equals its task's module run alone, and a
    batch of one task (the fast path) too; the backbone's hooks are left without per-row vectors."""
    a, dir_a = trained(tmp_path, "ia3", ["neg", "pos"], seed=1)
    b, dir_b = trained(tmp_path, "ia3", ["x", "y", "z"], seed=2)
    assert not torch.equal(a.ia3["encoder-layer-0-attention-self-key"].vector,
                           b.ia3["encoder-layer-0-attention-self-key"].vector)
    torch.manual_seed(0)
    served = MultiTaskModel({"a": dir_a, "b": dir_b})
    batch = make_batch(batch=6, seed=5)
    tasks = ["a", "b", "b", "a", "b", "a"]
    out = served(batch, tasks)
    with torch.no_grad():
        alone = {"a": a(batch), "b": b(batch)}
    for row, task in enumerate(tasks):
        assert out[row].shape == (2 if task == "a" else 3,)
        torch.testing.assert_close(out[row], alone[task][row], atol=1e-6, rtol=1e-6)
    for task in ("a", "b"):
        torch.testing.assert_close(torch.stack(served(batch, [task] * 6)), alone[task], atol=1e-6, rtol=1e-6)
    assert all(scale.rows is None for scale in served.scales.values())
    with pytest.raises(ValueError, match="one model serves deep prefixes or \\(IA\\)\\^3, not both"):
        MultiTaskModel({"a": dir_a, "p": trained(tmp_path, "ptuning_v2", ["neg", "pos"], seed=3)[1]})


def test_ia3_on_deberta_shared_position_keys_serves_one_task_per_batch(tmp_path):
    """DeBERTa with share_att_key runs its key projection on the position embeddings too, shared by
    the batch: one vector per row cannot apply there, so a mixed batch is refused with the reason;
    a batch of one task still equals the task alone."""
    model = {"config": {**tiny_model("deberta-v2")["config"], "share_att_key": True}}
    dirs, modules = {}, {}
    for task, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(0)
        m = METHODS["ia3"](model=model, method={"name": "ia3", "head": {"dropout": 0.0}}, num_labels=2)
        train_steps(m, [make_batch("deberta-v2", seed=seed)], 3)
        modules[task], dirs[task] = m.eval(), save_pretrained(m, tmp_path / task)
    served = MultiTaskModel(dirs)
    batch = make_batch("deberta-v2", batch=2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(served(batch, ["b", "b"])), modules["b"](batch), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="DeBERTa's shared position keys"):
        served(batch, ["a", "b"])
    assert all(scale.rows is None for scale in served.scales.values())


def test_mixing_refuses_methods_without_deep_prefixes(tmp_path):
    _, dir_a = trained(tmp_path, "ptuning_v2", ["neg", "pos"], seed=1)
    _, dir_l = trained(tmp_path, "lora", ["neg", "pos"], seed=2)
    with pytest.raises(ValueError, match="need deep prefixes"):
        MultiTaskModel({"a": dir_a, "l": dir_l})
    with pytest.raises(KeyError, match="unknown task"):
        MultiTaskModel({"a": dir_a})(make_batch(batch=1), ["zzz"])


def test_mixing_refuses_tasks_trained_on_another_random_backbone(tmp_path):
    """Two adapters on a randomly initialised backbone (model.config) of another draw (another seed):
    the same model settings, other weights. Served on the first one's backbone, the second task's
    logits would be wrong without a word; refused, as prompt transfer refuses such a source."""
    _, dir_a = trained(tmp_path, "ptuning_v2", ["neg", "pos"], seed=1)
    torch.manual_seed(7)
    other = METHODS["ptuning_v2"](model=tiny_model("bert"), method=dict(name="ptuning_v2", prefix_length=4),
                                  num_labels=2)
    save_pretrained(other, tmp_path / "other")
    with pytest.raises(ValueError, match=r"^task 'b' was trained on a randomly initialised backbone \(model.config\) "
                                         r"with other weights than task 'a'"):
        MultiTaskModel({"a": dir_a, "b": tmp_path / "other"})


def test_ensemble_equals_members_run_alone(tmp_path):
    members = [trained(tmp_path, "ptuning_v2", ["neg", "pos"], seed=s) for s in (1, 2, 3)]
    torch.manual_seed(0)
    served = MultiTaskModel({f"p{i}": d for i, (_, d) in enumerate(members)})
    batch = make_batch(batch=4, seed=9)
    result = ensemble(served, batch, ["p0", "p1", "p2"])
    with torch.no_grad():
        alone = torch.stack([m(batch).softmax(-1) for m, _ in members])
    torch.testing.assert_close(result["members"], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result["mean"], alone.mean(0), atol=1e-5, rtol=1e-5)
    votes = (alone.argmax(-1) == 1).sum(0)
    assert result["vote"].tolist() == (votes >= 2).long().tolist()


def verbalized(tmp_path, name, labels, seed, **method):
    """A deep-prefix task whose head is a verbalizer (label words through the frozen LM head): its
    module inserts a [MASK] token into the batch before the backbone and reads the LM head there."""
    spec = tiny_model("bert")
    spec["config"]["vocab_size"] = 30522  # the embedded MiniLM tokenizer's: its label words map into the model
    spec["tokenizer"] = "embedded:minilm"
    torch.manual_seed(0)  # one random backbone for every task
    cfg = dict(name=name, prefix_length=4, depth="deep", reparameterization="none", reparam_hidden=16,
               head={"type": "verbalizer"})
    cfg.update(method)
    m = METHODS[name](model=spec, method=cfg, num_labels=len(labels), labels=labels)
    torch.manual_seed(seed)
    with torch.no_grad():  # a prefix of its own (training one would need LM-sized batches)
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    save_pretrained(m, tmp_path / f"{name}-{seed}")
    return m.eval(), tmp_path / f"{name}-{seed}"


def test_verbalizer_heads_are_served_with_their_mask_token(tmp_path):
    """Served, a verbalizer task gives the logits its module gives alone, on a one-task batch (the
    fast path) and in a mixed batch (before: the server ran the batch without the [MASK] token the
    module inserts, and the head read a real token's LM scores: other logits, without a word)."""
    a, dir_a = verbalized(tmp_path, "ptuning_v2", ["negative", "positive"], seed=1)
    b, dir_b = verbalized(tmp_path, "prefix_tuning", ["bad", "good", "fine"], seed=2, prefix_length=6,
                          reparameterization="mlp")
    served = MultiTaskModel({"a": dir_a, "b": dir_b})
    batch = make_batch(batch=4, seed=5)
    with torch.no_grad():
        alone = {"a": a(batch), "b": b(batch)}
    for tasks in (["a"] * 4, ["b"] * 4, ["a", "b", "b", "a"]):
        for row, (task, logits) in enumerate(zip(tasks, served(batch, tasks))):
            torch.testing.assert_close(logits, alone[task][row], atol=1e-5, rtol=1e-5)


def test_mixing_refuses_a_verbalizer_task_beside_a_linear_head(tmp_path):
    """One batch cannot both carry the verbalizer's [MASK] token and leave it out."""
    v, dir_v = verbalized(tmp_path, "ptuning_v2", ["negative", "positive"], seed=1)
    spec = tiny_model("bert")
    spec["config"]["vocab_size"] = 30522
    spec["tokenizer"] = "embedded:minilm"
    linear = METHODS["ptuning_v2"](model=spec, method=dict(name="ptuning_v2", prefix_length=4), num_labels=2)
    linear.backbone.load_state_dict(v.backbone.state_dict(), strict=False)  # the same backbone (+ its pooler)
    save_pretrained(linear, tmp_path / "linear")
    with pytest.raises(ValueError, match="verbalizer head"):
        MultiTaskModel({"v": dir_v, "l": tmp_path / "linear"})
