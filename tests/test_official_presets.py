"""The official-settings presets (conf/experiment/*_official.yaml) and their knobs: P-Tuning v2's
head on the backbone's pooler, the backbone's dropout, warmup as a step count."""
import pytest
import torch
from conftest import TINY, make_batch, tiny_model, train_steps
from safetensors import safe_open
from test_configs import compose_cfg

from peft_lightning.backbone import resolve
from peft_lightning.errors import ConfigError
from peft_lightning.methods import METHODS
from peft_lightning.validation import validate_config


def pooled(arch="bert", name="ptuning_v2", **method):
    spec = dict(name=name, prefix_length=4, reparameterization="none", depth="deep",
                head={"type": "pooler", "dropout": 0.1}, **method)
    return METHODS[name](model=tiny_model(arch), method=spec, num_labels=3, labels=["a", "b", "c"])


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_pooler_head_is_linear_on_tanh_of_the_dense_first_token(arch):
    """logits = W (tanh(D h_0 + d)) + w with h_0 the first real token's last hidden state (after
    the prefix) and D, d the backbone's own pooler weights, by hand."""
    torch.manual_seed(0)
    m = pooled(arch).eval()
    assert m.head.pooler is m.backbone.pooler  # the backbone's module, not a copy
    batch = make_batch(arch, length=9)
    with torch.no_grad():
        first = m.encode(batch)[:, 0]
        dense = m.backbone.pooler.dense
        want = torch.tanh(first @ dense.weight.T + dense.bias) @ m.head.linear.weight.T + m.head.linear.bias
        torch.testing.assert_close(m(batch), want, atol=1e-6, rtol=1e-6)


def test_pooler_head_equals_the_backbones_pooler_output():
    """Without a prefix in the way (finetune), the head reads exactly transformers' pooler_output."""
    torch.manual_seed(0)
    m = pooled(name="finetune").eval()
    batch = make_batch("bert", length=9)
    with torch.no_grad():
        reference = m.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        torch.testing.assert_close(m(batch), m.head.linear(reference), atol=1e-6, rtol=1e-6)


def test_pooler_stays_frozen_and_out_of_the_adapter():
    torch.manual_seed(0)
    m = pooled()
    before = {k: v.clone() for k, v in m.backbone.pooler.state_dict().items()}
    linear = m.head.linear.weight.detach().clone()
    train_steps(m, [make_batch("bert", seed=s) for s in range(2)], 3)
    assert all(torch.equal(before[k], v) for k, v in m.backbone.pooler.state_dict().items())
    assert not torch.equal(linear, m.head.linear.weight)  # the linear layer on it trains
    assert not [k for k in m.trainable_state_keys() if "pooler" in k]
    assert {k for k in m.trainable_state_keys() if k.startswith("head.")} == {"head.linear.weight", "head.linear.bias"}


UNTRAINED = "this backbone's pooler looks untrained"


def test_pooler_head_uses_the_embedded_backbones_own_pooler_and_says_it_is_untrained(caplog):
    """The embedded MiniLM ships a pooler it never trained: its dense bias is exactly 0. The head reads that
    pooler as it is, and says it is untrained."""
    with caplog.at_level("WARNING", logger="peft_lightning.methods.base"):
        m = METHODS["ptuning_v2"](model={"name_or_path": "embedded:minilm"},
                                  method=dict(name="ptuning_v2", prefix_length=2, head={"type": "pooler"}), num_labels=2)
    folder, _ = resolve("embedded:minilm")
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        torch.testing.assert_close(m.head.pooler.dense.weight, f.get_tensor("pooler.dense.weight"), atol=0, rtol=0)
        assert not f.get_tensor("pooler.dense.bias").any()  # (the fact the warning rests on)
    assert sum(UNTRAINED in r.message for r in caplog.records) == 1


def test_a_trained_pooler_gives_no_warning_an_untrained_one_does(tmp_path, caplog):
    """The same tiny BERT saved twice: with transformers' initialisation (pooler bias 0: untrained) and with a
    pooler bias moved off 0 (as any trained pooler's is); and a RoBERTa saved without a pooler. Only the trained
    pooler gives no warning."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**TINY["bert"]))
    bert.save_pretrained(tmp_path / "untrained")
    with torch.no_grad():
        bert.pooler.dense.bias.normal_()
    bert.save_pretrained(tmp_path / "trained")
    # RoBERTa's checkpoints ship no pooler (roberta-base, roberta-large are saved as RobertaForMaskedLM):
    # transformers initialises one at random, and the head reads that
    from transformers import RobertaConfig, RobertaForMaskedLM
    RobertaForMaskedLM(RobertaConfig(**TINY["roberta"])).save_pretrained(tmp_path / "no_pooler")
    for name, warns in (("untrained", True), ("trained", False), ("no_pooler", True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="peft_lightning.methods.base"):
            METHODS["ptuning_v2"](model={"name_or_path": str(tmp_path / name)}, num_labels=2,
                                  method=dict(name="ptuning_v2", prefix_length=2, head={"type": "pooler"}))
        assert any(UNTRAINED in r.message for r in caplog.records) == warns, name


def test_pooler_head_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"method.head.type=pooler reads the backbone's pooler, and a 'gpt2' "
                                          r"backbone has none \(BERT and RoBERTa do\): use method.head.type=linear"):
        pooled("gpt2")
    with pytest.raises(ConfigError, match=r"does not fit data.task=TokenClassification"):
        METHODS["ptuning_v2"](model=tiny_model("bert"), task={"name": "token_classification"}, num_labels=3, labels=["O", "B", "I"],
                              method=dict(name="ptuning_v2", prefix_length=2, head={"type": "pooler"}))


def test_official_presets_compose_validate_and_set_the_official_values():
    ptv2 = compose_cfg(["experiment=ptuning_v2_official"])
    validate_config(ptv2)
    m = ptv2.method
    assert (m.name, m.head.type, m.backbone_dropout, m.optim.warmup_ratio) == ("ptuning_v2", "pooler", True, 0.0)
    assert (m.prefix_dropout, m.head.dropout, ptv2.data.batch_size) == (0.1, 0.1, 32)  # already the official values
    prefix = compose_cfg(["experiment=prefix_tuning_official", "data=sms_spam"])  # composes with any data
    validate_config(prefix)
    m = prefix.method
    assert (m.name, m.prefix_length, m.reparameterization, m.reparam_hidden) == ("prefix_tuning", 10, "mlp", 512)
    assert (m.optim.lr, m.optim.warmup_steps, m.prefix_dropout, m.backbone_dropout) == (5e-5, 100, 0.0, False)
    assert prefix.data.name == "sms_spam"


@pytest.mark.parametrize("preset", ["ptuning_v2_official", "prefix_tuning_official"])
def test_official_presets_build_and_train_a_step(preset):
    from peft_lightning.run import build

    cfg = compose_cfg([f"experiment={preset}", "model=tiny-bert"])
    _, m = build(cfg)
    assert m.train().backbone.training is (preset == "ptuning_v2_official")  # its dropout on, or off
    assert train_steps(m, [make_batch("bert", seed=0)], 1)


def test_warmup_steps_is_a_count_and_wins_over_the_ratio():
    """The schedule's multiplier by hand: linear up over warmup_steps, then linear down to 0 at the end."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    m = pooled(optim={"lr": 1.0, "warmup_ratio": 0.5, "warmup_steps": 2})
    m._trainer = SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads
    scheduler = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = []
    for _ in range(10):
        factors.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert factors == pytest.approx([0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    for bad in (-1, 1.5, True):
        cfg = compose_cfg([f"method.optim.warmup_steps={str(bad).lower()}"])
        with pytest.raises(ConfigError, match="method.optim.warmup_steps must be a count >= 0"):
            validate_config(cfg)
