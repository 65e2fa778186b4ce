"""LoRA+ (Hayou et al., 2024; `method.optim.lr_ratio`): LoRA's B matrices learn at lr x ratio, in
their own optimizer parameter group, for lora, dora and unipelt's LoRA part; everything else at lr."""
from types import SimpleNamespace

import pytest
import torch
from conftest import make_batch, tiny_model
from test_config_schema import no_weights  # noqa: F401 (fixture)
from test_configs import compose_cfg

from peft_lightning.errors import CheckpointError, ConfigError
from peft_lightning.methods import METHODS
from peft_lightning.validation import validate_config

LR, RATIO, STEPS = 1e-3, 16, 20


def build(name, ratio, warmup=0.0):
    torch.manual_seed(0)
    method = dict(name=name, r=4, alpha=8, dropout=0.0, bottleneck=4, prefix_length=2, reparam_hidden=8,
                  head={"dropout": 0.0}, optim={"lr": LR, "lr_ratio": ratio, "warmup_ratio": warmup})
    m = METHODS[name](model=tiny_model("bert"), method=method, num_labels=2)
    m._trainer = SimpleNamespace(estimated_stepping_batches=STEPS)  # all configure_optimizers reads of it
    return m


def b_matrices(m):  # by name: every LoRA module's B (lora.<target>.B), independently of the code's isinstance
    return {n for n, _ in m.named_parameters() if n.startswith("lora.") and n.endswith(".B")}


@pytest.mark.parametrize("name", ["lora", "dora", "unipelt"])
def test_b_matrices_get_their_own_group_at_lr_times_ratio_through_the_schedule(name):
    m = build(name, RATIO, warmup=0.1)
    config = m.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    names = {id(p): n for n, p in m.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert len(b_matrices(m)) == 6  # query and value in 3 layers
    assert groups == [trainable - b_matrices(m), b_matrices(m)]
    warmup = int(0.1 * STEPS)
    for step in range(STEPS):  # the linear warmup-then-decay schedule, by hand, for both groups
        factor = step / warmup if step < warmup else (STEPS - step) / (STEPS - warmup)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([LR * factor, LR * RATIO * factor])
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_one_step_moves_b_ratio_times_as_far_and_the_rest_the_same(name):
    """The same model, batch and gradients: AdamW's first step with ratio 16 moves every B matrix
    exactly 16 times as far as with ratio 1, and every other tensor (head, DoRA's magnitudes) as far."""
    batch = make_batch(length=8)
    moved = []
    for ratio in (1, RATIO):
        m = build(name, ratio)
        optimizer = m.configure_optimizers()["optimizer"]
        assert len(optimizer.param_groups) == (1 if ratio == 1 else 2)  # no LoRA+: the group checkpoints hold
        before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        m.train()
        torch.nn.functional.cross_entropy(m(batch), batch["labels"]).backward()
        optimizer.step()
        moved.append({n: p.detach() - before[n] for n, p in m.named_parameters() if p.requires_grad})
    plain, plus = moved
    for n in plain:
        want = plain[n] * (RATIO if n in b_matrices(m) else 1)
        torch.testing.assert_close(plus[n], want, rtol=1e-5, atol=1e-9)
        if n in b_matrices(m) or n.startswith("head.") or n.endswith(".magnitude"):
            assert plain[n].abs().max() > LR / 2, n  # each of them really moved


def test_lr_ratio_without_lora_matrices_is_refused():
    with pytest.raises(ConfigError, match=r"^method.optim.lr_ratio=16.0 sets the learning rate of LoRA's B matrices, "
                                          r"and method=ia3 has none; leave it at 1$"):
        build("ia3", RATIO).configure_optimizers()


@pytest.mark.parametrize("overrides,message", [
    (["method=lora", "method.optim.lr_ratio=0"], r"^method.optim.lr_ratio must be a positive number, got 0$"),
    (["method=dora", "method.optim.lr_ratio=-2"], r"^method.optim.lr_ratio must be a positive number, got -2$"),
    (["method=adapter", "+method.optim.lr_ratio=16"], r"^method.optim.lr_ratio is a knob of method=dora, lora, "
                                                      r"unipelt only, not of method=adapter"),
])
def test_lr_ratio_config_errors_name_the_key(overrides, message, no_weights):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg(overrides))


@pytest.mark.parametrize("method", ["lora", "dora", "unipelt"])
def test_lr_ratio_is_a_knob_of_every_lora_method(method, no_weights):  # noqa: F811
    validate_config(compose_cfg([f"method={method}", "method.optim.lr_ratio=16"]))


def checkpoint_of(m):
    """What Lightning's checkpoint holds of a module: its trainable tensors and the optimizer's state."""
    return {"state_dict": m.trainable_state_dict(), "optimizer_states": [m.configure_optimizers()["optimizer"].state_dict()]}


@pytest.mark.parametrize("saved,resumed,groups", [(1, RATIO, (1, 2)), (RATIO, 1, (2, 1))])
def test_resume_with_another_lr_ratio_is_a_checkpoint_error_naming_the_key(saved, resumed, groups):
    """A resume whose lr_ratio adds or drops LoRA+'s group: a one-line user error (exit 2), not torch's
    'loaded state dict has a different number of parameter groups' traceback."""
    with pytest.raises(CheckpointError, match=rf"^checkpoint: its optimizer has {groups[0]} parameter group\(s\), this "
                                              rf"run {groups[1]}: method.optim.lr_ratio differs from the run's"):
        build("lora", resumed).on_load_checkpoint(checkpoint_of(build("lora", saved)))
    build("lora", saved).on_load_checkpoint(checkpoint_of(build("lora", saved)))  # the run's own: loads


@pytest.mark.parametrize("change,message", [
    ({"lr_ratio": 8}, r"LoRA's B matrices \(LoRA\+\) at learning rate 0.016, this run's settings give 0.008"),
    ({"lr": 2e-3}, r"its parameters at learning rate 0.001, this run's settings give 0.002"),
    ({"weight_decay": 0.01}, r"its parameters at weight decay 0, this run's settings give 0.01")])
def test_resume_with_other_optimizer_settings_of_the_same_groups_is_a_checkpoint_error(change, message):
    """torch's load_state_dict puts the saved groups' rates and weight decay back (checked first, on torch
    itself), so a resume with another lr, weight_decay or a LoRA+ ratio that keeps two groups (16 -> 8)
    would train at the checkpoint's values while the run's config and results.json say the new ones:
    a one-line CheckpointError naming method.optim instead."""
    saved = build("lora", RATIO)
    resumed = build("lora", RATIO)
    resumed.method_cfg["optim"].update(change)
    optimizer = resumed.configure_optimizers()["optimizer"]
    optimizer.load_state_dict(saved.configure_optimizers()["optimizer"].state_dict())
    assert [g["lr"] for g in optimizer.param_groups] == [LR, LR * RATIO]  # the premise: the checkpoint's win
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    with pytest.raises(CheckpointError, match=rf"^checkpoint: its optimizer trained {message} \(method\.optim\.lr=.*"
                                              r"the checkpoint's would win on load: resume with the run's own "
                                              r"method.optim settings$"):
        resumed.on_load_checkpoint(checkpoint_of(saved))
    build("dora", RATIO).on_load_checkpoint(checkpoint_of(build("dora", RATIO)))  # the run's own settings: load
    plain = build("ia3", 1)
    plain.on_load_checkpoint(checkpoint_of(build("ia3", 1)))


def test_resume_as_another_method_or_shape_is_a_checkpoint_error():
    """A LoRA checkpoint resumed as DoRA (no magnitudes) or with another rank: CheckpointError (exit 2)
    naming the tensors, not a KeyError / size-mismatch traceback."""
    ckpt = checkpoint_of(build("lora", 1))
    with pytest.raises(CheckpointError, match=r"^checkpoint lacks trainable tensors \['lora.encoder-layer-0-attention-"
                                              r"self-query.magnitude', .*saved by another method or configuration"):
        build("dora", 1).on_load_checkpoint(ckpt)
    torch.manual_seed(0)
    other = METHODS["lora"](model=tiny_model("bert"), method=dict(name="lora", r=2), num_labels=2)
    with pytest.raises(CheckpointError, match=r"^checkpoint: tensor lora.encoder-layer-0-attention-self-query.A has "
                                              r"shape torch.Size\(\[4, 32\]\), this run's settings build "
                                              r"torch.Size\(\[2, 32\]\)"):
        other.on_load_checkpoint(ckpt)


def test_python_callers_nested_knobs_are_checked_and_saved_only_where_read(tmp_path):
    """Built in Python (no Hydra schema): a misspelt optim knob is refused, not silently dropped (LoRA+
    would be off); a shared optim dict's lr_ratio on a method without LoRA is not written into its
    adapter, whose config is read back strictly (it failed to load: unknown key method.optim.lr_ratio)."""
    import json

    from peft_lightning.checkpoint import load_pretrained, save_pretrained

    with pytest.raises(ConfigError, match=r"^unknown key method.optim.lr_ratoi \(did you mean method.optim.lr_ratio\?\)$"):
        METHODS["lora"](model=tiny_model("bert"), method=dict(name="lora", optim={"lr_ratoi": 16}), num_labels=2)
    with pytest.raises(ConfigError, match=r"^unknown key method.head.pooing \(did you mean method.head.pooling\?\)$"):
        METHODS["ia3"](model=tiny_model("bert"), method=dict(name="ia3", head={"pooing": "mean"}), num_labels=2)
    m = METHODS["ia3"](model=tiny_model("bert"), method=dict(name="ia3", optim={"lr": LR, "lr_ratio": 1}), num_labels=2)
    folder = save_pretrained(m, tmp_path / "adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["method"]["optim"] == {"lr": LR}
    load_pretrained(folder)
