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


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_dora_and_ia3_export_load_in_peft_with_the_same_logits(tmp_path, name, arch):
    """peft's own DoRA (`use_dora`) and IA3 layers, reading our exported tensors, compute our
    hidden states: an independent implementation of the same method. Trained first, so the
    magnitudes and vectors are far from their identity start (and dropout 0.1 is on in training)."""
    m = trained(name, arch, dropout=0.1)
    export_peft(m, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(fresh_base(m), str(tmp_path / "peft")).eval()
    config = loaded.peft_config["default"]
    want = ("LORA", True) if name == "dora" else ("IA3", None)
    assert (config.peft_type.value, getattr(config, "use_dora", None)) == want
    batch = make_batch(arch, seed=4)
    with torch.no_grad():
        hidden = loaded(**m.backbone_inputs(batch)).last_hidden_state
        torch.testing.assert_close(m.head(hidden, batch["attention_mask"]), m(batch), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, m.run_backbone(batch), atol=1e-5, rtol=1e-5)
        assert (hidden - fresh_base(m)(**m.backbone_inputs(batch)).last_hidden_state).abs().max() > 1e-4


def test_peft_dora_imports_with_the_same_hidden_states(tmp_path):
    """A DoRA made by peft itself (use_dora, magnitudes moved off their start) imports as method=dora."""
    from peft_lightning.export import import_peft

    torch.manual_seed(0)
    base = load_backbone(BackboneSpec(**tiny_model("bert"))).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    dora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                     use_dora=True, task_type="FEATURE_EXTRACTION"))
    with torch.no_grad():
        for n, p in dora.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(torch.randn_like(p) * 0.5)
    dora.save_pretrained(str(tmp_path / "theirs"))
    ours = import_peft(tmp_path / "theirs", model=tiny_model("bert"), num_labels=2)
    assert ours.hparams.method["name"] == "dora"
    ours.backbone.load_state_dict(base_state)
    batch = make_batch("bert", seed=6)
    with torch.no_grad():
        theirs = dora.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        torch.testing.assert_close(ours.run_backbone(batch), theirs, atol=1e-5, rtol=1e-5)


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


# --- the output folder: never the adapter, never a non-empty folder without --overwrite -----------
@pytest.fixture
def adapter(tmp_path):
    from peft_lightning.checkpoint import save_pretrained

    folder = save_pretrained(trained("lora", "bert"), tmp_path / "adapter")
    return folder, {p.name: p.read_bytes() for p in folder.iterdir()}


def _unchanged(folder, files):
    return {p.name: p.read_bytes() for p in folder.iterdir()} == files


@pytest.mark.parametrize("where", ["same", "inside", "symlink", "dot"])
def test_export_refuses_to_write_into_the_adapter(adapter, tmp_path, capsys, where):
    from peft_lightning.export import main

    folder, files = adapter
    if where == "symlink":
        (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    out = {"same": folder, "inside": folder / "peft", "symlink": tmp_path / "link", "dot": folder / "sub" / ".."}[where]
    assert main([str(folder), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: output folder {out} is ")
    assert f"adapter folder {folder}: the export would overwrite" in err[0]
    assert _unchanged(folder, files) and not (folder / "peft").exists()


def test_export_never_overwrites_a_non_empty_folder_unasked(adapter, tmp_path, capsys):
    from peft_lightning.export import main

    folder, _ = adapter
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(folder), str(out)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main([str(folder), str(out), "--overwrite"]) == 0  # replaces export's own files, keeps the others
    assert {"adapter_config.json", "adapter_model.safetensors", "notes.txt"} <= {p.name for p in out.iterdir()}
    assert (out / "notes.txt").read_text() == "mine"
    assert main([str(folder), str(tmp_path / "new")]) == 0  # a new folder needs no flag


def test_export_into_itself_from_the_command_line(adapter):
    import subprocess
    import sys

    folder, files = adapter
    proc = subprocess.run([sys.executable, "-m", "peft_lightning.export", str(folder), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: output folder {folder} is the adapter folder {folder}: the export would overwrite or mix with the "
        "adapter's files; choose a folder outside it"]
    assert _unchanged(folder, files)
