"""Export to the HF peft format: peft loads it; LoRA gives the same outputs, a prefix its own table."""
import pytest
import torch
from conftest import make_batch, tiny_model, train_steps

from peft_lightning.backbone import BackboneSpec, load_backbone
from peft_lightning.export import export_peft
from peft_lightning.methods import METHODS

peft = pytest.importorskip("peft")


def trained(name, arch, **method):
    torch.manual_seed(0)
    cfg = dict(name=name, r=4, alpha=8, prefix_length=4, depth="deep", reparameterization="mlp",
               reparam_hidden=16, head={"dropout": 0.0})
    cfg.update(method)
    m = METHODS[name](model=tiny_model(arch), method=cfg, num_labels=2)
    train_steps(m, [make_batch(arch, length=8)], 5)
    return m.eval()


def fresh_base(m):
    base = load_backbone(BackboneSpec(**tiny_model(m.backbone.config.model_type)))
    base.load_state_dict(m.backbone.state_dict())
    return base.eval()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_lora_export_loads_in_peft_with_the_same_logits(tmp_path, arch):
    m = trained("lora", arch)
    export_peft(m, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(fresh_base(m), str(tmp_path / "peft")).eval()
    batch = make_batch(arch, seed=4)
    with torch.no_grad():
        hidden = loaded(**m.backbone_inputs(batch)).last_hidden_state
        torch.testing.assert_close(m.head(hidden, batch["attention_mask"]), m(batch), atol=1e-5, rtol=1e-5)
        assert (hidden - fresh_base(m)(**m.backbone_inputs(batch)).last_hidden_state).abs().max() > 1e-4


def test_prefix_export_holds_the_ejected_prefix_in_peft_layout(tmp_path):
    m = trained("prefix_tuning", "bert")
    export_peft(m, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(fresh_base(m), str(tmp_path / "peft"))
    table = loaded.prompt_encoder["default"].embedding.weight
    state = m.prefix(1)
    # peft's layout: token -> (layer, key|value, head, head_dim), as ours
    kv = table.detach().view(4, 3, 2, 4, 8).permute(1, 2, 3, 0, 4)
    for layer in range(3):
        torch.testing.assert_close(kv[layer, 0], state.keys[layer][0])
        torch.testing.assert_close(kv[layer, 1], state.values[layer][0])


def test_export_refuses_methods_without_a_peft_twin(tmp_path):
    with pytest.raises(ValueError, match="no peft twin"):
        export_peft(trained("adapter", "bert", bottleneck=4), tmp_path)


@pytest.mark.parametrize("name", ["lora", "ptuning_v2"])
def test_export_then_import_gives_the_same_logits(tmp_path, name):
    from peft_lightning.export import import_peft

    m = trained(name, "bert", reparameterization="none")
    export_peft(m, tmp_path / "peft")
    back = import_peft(tmp_path / "peft", model=tiny_model("bert"), num_labels=2)
    back.backbone.load_state_dict(m.backbone.state_dict())  # (a random tiny backbone: share its weights)
    batch = make_batch("bert", seed=5)
    with torch.no_grad():
        torch.testing.assert_close(back(batch), m(batch), atol=1e-6, rtol=1e-6)


def test_import_of_an_adapter_made_by_peft(tmp_path):
    """A LoRA trained with peft itself (its own target names) computes the same hidden states here."""
    from peft_lightning.export import import_peft

    torch.manual_seed(0)
    base = load_backbone(BackboneSpec(**tiny_model("bert"))).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}  # (peft renames the wrapped layers)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                     task_type="FEATURE_EXTRACTION"))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_()
    lora.save_pretrained(str(tmp_path / "theirs"))
    ours = import_peft(tmp_path / "theirs", model=tiny_model("bert"), num_labels=2)
    ours.backbone.load_state_dict(base_state)
    batch = make_batch("bert", seed=6)
    with torch.no_grad():
        theirs = lora.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        torch.testing.assert_close(ours.run_backbone(batch), theirs, atol=1e-5, rtol=1e-5)
    assert len(ours.lora) == 2 * 3  # query and value in each of the 3 layers
