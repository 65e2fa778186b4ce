"""Every method x every supported architecture, on tiny random configs.

The parameter formulas are derived by hand from each architecture's shapes (GEOMETRY below) and
the formulas in the methods' docstrings, not read back from the modules under test.
"""
import pytest
import torch
from conftest import ARCHS, TINY, make_batch, tiny_model, train_steps

from peft_lightning.checkpoint import load_pretrained, save_pretrained
from peft_lightning.injection.prefix import PrefixState
from peft_lightning.methods import METHODS

P, H, REPARAM_HIDDEN, BOTTLENECK, R, HIDDEN = 4, 32, 16, 8, 4, 32

# per tiny architecture (3 layers, width 32, 4 heads of 8; Llama: 2 key/value heads):
#   slots: attention modules (encoder-decoders: encoder self + decoder self + cross, 3 each)
#   kv: key/value width per slot;  attn/ffn: adapted attention / feed-forward outputs (width 32)
#   inner: the feed-forward's intermediate width (intermediate_size / d_ff 37; GPT-2's 4 x 32)
#   lora: (in, out) of each default LoRA target
QV = [(32, 32)] * 6
GEOMETRY = {
    "bert": dict(slots=3, kv=32, attn=3, ffn=3, inner=37, lora=QV),
    "roberta": dict(slots=3, kv=32, attn=3, ffn=3, inner=37, lora=QV),
    "deberta-v2": dict(slots=3, kv=32, attn=3, ffn=3, inner=37, lora=QV),
    "gpt2": dict(slots=3, kv=32, attn=3, ffn=3, inner=128, lora=[(32, 96)] * 3),  # fused q/k/v
    "llama": dict(slots=3, kv=16, attn=3, ffn=3, inner=37, lora=[(32, 32)] * 3 + [(32, 16)] * 3),
    "t5": dict(slots=9, kv=32, attn=9, ffn=6, inner=37, lora=[(32, 32)] * 18),
    "bart": dict(slots=9, kv=32, attn=9, ffn=6, inner=37, lora=[(32, 32)] * 18),
}
HEAD = HIDDEN * 2 + 2

# the knobs each method runs with here (its own defaults, shrunk)
METHOD_CFG = {
    "ptuning_v2": dict(depth="deep", reparameterization="none"),
    "prefix_tuning": dict(depth="deep", reparameterization="mlp", eject_on_export=True),
    "prompt_tuning": dict(depth="embedding", reparameterization="none", init="uniform"),
    "p_tuning": dict(depth="embedding", reparameterization="lstm", eject_on_export=True),
    "adapter": dict(style="houlsby"),
    "lora": dict(),
    "dora": dict(),
    "ia3": dict(),
    "bitfit": dict(),
    "finetune": dict(),
    "unipelt": dict(depth="deep", reparameterization="mlp"),
}
NO_BIASES = {"llama", "t5"}


def method_cfg(name, **over):
    cfg = dict(name=name, prefix_length=P, reparam_hidden=REPARAM_HIDDEN, bottleneck=BOTTLENECK, r=R, alpha=8,
               prefix_dropout=0.0, head={"dropout": 0.0}, **METHOD_CFG[name])
    cfg.update(over)
    return cfg


def build(name, arch, **over):
    return METHODS[name](model=tiny_model(arch), method=method_cfg(name, **over), num_labels=2)


def mlp(width):
    return P * HIDDEN + (HIDDEN * REPARAM_HIDDEN + REPARAM_HIDDEN) + (REPARAM_HIDDEN * width + width)


def lstm(width):
    h = REPARAM_HIDDEN // 2
    layers = sum(2 * (4 * h * (i + h) + 8 * h) for i in (HIDDEN, 2 * h))  # biLSTM, 2 layers, 2 biases
    return P * HIDDEN + layers + (2 * h * REPARAM_HIDDEN + REPARAM_HIDDEN) + (REPARAM_HIDDEN * width + width)


def adapter(width, gated=False):
    return 2 * width * BOTTLENECK + BOTTLENECK + width + (width + 1 if gated else 0)


def expected_trainable(name, arch, model):
    g = GEOMETRY[arch]
    deep = g["slots"] * 2 * g["kv"]
    if name == "ptuning_v2":
        return P * deep + HEAD
    if name == "prefix_tuning":
        return mlp(deep) + HEAD
    if name == "prompt_tuning":
        return P * HIDDEN + HEAD
    if name == "p_tuning":
        return lstm(HIDDEN) + HEAD
    if name == "adapter":
        return (g["attn"] + g["ffn"]) * adapter(HIDDEN) + HEAD
    if name == "lora":
        return sum(R * (i + o) for i, o in g["lora"]) + HEAD
    if name == "dora":  # + a magnitude per output feature
        return sum(R * (i + o) + o for i, o in g["lora"]) + HEAD
    if name == "ia3":  # a key and a value vector per attention module, an intermediate vector per feed-forward
        return g["slots"] * 2 * g["kv"] + g["ffn"] * g["inner"] + HEAD
    if name == "unipelt":
        lora = sum(R * (i + o) + i + 1 for i, o in g["lora"])
        return mlp(deep) + g["slots"] + g["ffn"] * adapter(HIDDEN, gated=True) + lora + HEAD
    if name == "bitfit":  # every bias of the backbone except an (unused) pooler's
        return sum(p.numel() for n, p in model.backbone.named_parameters()
                   if n.endswith(".bias") and not n.startswith("pooler.")) + HEAD
    if name == "finetune":
        pooler = getattr(model.backbone, "pooler", None)
        return sum(p.numel() for p in model.backbone.parameters()) - (
            sum(p.numel() for p in pooler.parameters()) if pooler is not None else 0) + HEAD
    raise AssertionError(name)


CASES = [(m, a) for m in METHODS for a in ARCHS if not (m == "bitfit" and a in NO_BIASES)]


@pytest.mark.parametrize("name,arch", CASES)
def test_method_trains_only_its_parameters(name, arch):
    m = build(name, arch)
    assert m.parameter_counts()["trainable"] == expected_trainable(name, arch, m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    batch = make_batch(arch, length=8)
    with torch.no_grad():  # token-level outputs stay aligned with the input tokens
        assert m.encode(batch).shape == (3, 8, HIDDEN)
    losses = train_steps(m, [batch], 4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    for n, p in m.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"trainable {n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


@pytest.mark.parametrize("arch", sorted(NO_BIASES))
def test_bitfit_on_a_backbone_without_biases_says_so(arch):
    with pytest.raises(ValueError, match=f"'{arch}' has none"):
        build("bitfit", arch)


def test_unsupported_architecture_names_the_supported_ones():
    cfg = dict(model_type="distilbert", vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37)
    with pytest.raises(ValueError, match="Supported: bart, bert, deberta-v2, gpt2, llama, qwen2, roberta, t5"):
        METHODS["ptuning_v2"](model={"config": cfg}, method=method_cfg("ptuning_v2"), num_labels=2)


# --- equivalences: each method starts from (or can be reduced to) the frozen backbone exactly ----

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["lora", "adapter", "dora", "ia3"])
def test_hooked_methods_start_equal_to_the_base(name, arch):
    """LoRA's B and the adapters' up-projections start at zero, DoRA's magnitude at the weight's
    own norm, (IA)^3's vectors at ones: outputs are the backbone's, bit for bit."""
    m = build(name, arch).eval()
    batch = make_batch(arch)
    with torch.no_grad():
        out = m.encode(batch)
        for handle_owner in m.backbone.modules():  # the same backbone without our hooks
            handle_owner._forward_hooks.clear()
            handle_owner._forward_pre_hooks.clear()
        ref = m.encode(batch)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_prefix_equals_the_base_on_every_architecture(arch):
    """A prefix every example is masked from leaves encoder, decoder and cross-attention unchanged
    at every real token (DeBERTa's fully masked padding rows average over what they are given)."""
    m = build("ptuning_v2", arch).eval()
    batch = make_batch(arch)
    with torch.no_grad():
        state = m.prefix(3)
        loud = PrefixState({k: v * 30 for k, v in state.keys.items()}, {k: v * 30 for k, v in state.values.items()})
        ref = m.run_backbone(batch)
        masked = PrefixState(loud.keys, loud.values, torch.zeros(3, P, dtype=torch.bool))
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(m.run_backbone(batch, prefix=masked)[real], ref[real], atol=1e-5, rtol=0)
        assert (m.run_backbone(batch, prefix=loud) - ref).abs().max() > 1e-2  # unmasked, it matters


@pytest.mark.parametrize("arch", ARCHS)
def test_bitfit_trains_biases_alone(arch):
    if arch in NO_BIASES:  # nothing to train: refused with the reason, not skipped
        with pytest.raises(ValueError, match=r"method=bitfit trains bias terms, and architecture '.*' has none"):
            build("bitfit", arch)
        return
    m = build("bitfit", arch)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {f"backbone.{n}" for n, _ in m.backbone.named_parameters()
                     if n.endswith(".bias") and not n.startswith("pooler.")} | {"head.linear.weight", "head.linear.bias"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["prefix_tuning", "p_tuning"])
def test_ejected_reparameterization_gives_the_same_logits(tmp_path, name, arch):
    """Li & Liang: train through the MLP, export the flat prefix it produces; P-Tuning likewise."""
    m = build(name, arch)
    train_steps(m, [make_batch(arch, length=8)], 3)
    m.eval()
    batch = make_batch(arch, seed=2)
    with torch.no_grad():
        want = m(batch)
    save_pretrained(m, tmp_path / "a")
    torch.manual_seed(0)  # the same random backbone; the trained tensors must come from the file
    fresh = load_pretrained(tmp_path / "a")
    assert fresh.prompt_encoder.net is None and fresh.hparams.method["reparameterization"] == "none"
    assert fresh.parameter_counts()["trainable"] < m.parameter_counts()["trainable"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["lora", "adapter", "unipelt", "prompt_tuning", "dora", "ia3"])
def test_save_load_round_trip(tmp_path, name, arch):
    m = build(name, arch)
    train_steps(m, [make_batch(arch, length=8)], 3)
    m.eval()
    batch = make_batch(arch, seed=2)
    with torch.no_grad():
        want = m(batch)
    save_pretrained(m, tmp_path / "a")
    torch.manual_seed(0)  # the same random backbone; the trained tensors must come from the file
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "a")(batch), want, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefixes_work_with_activation_checkpointing(arch):
    """Same loss and gradients with checkpointing, and the layers really are recomputed (with the
    frozen backbone in eval mode, as in training)."""
    batch = make_batch(arch, length=8)

    def run(checkpointing):
        torch.manual_seed(0)
        m = build("unipelt", arch, activation_checkpointing=checkpointing)
        m.train()
        assert not any(mod.training for mod in m.backbone.modules() if isinstance(mod, torch.nn.Dropout))
        calls = []
        slot_module = next(mod for mod in m.backbone.modules() if hasattr(mod, "_peft_prefix_slot"))
        slot_module.register_forward_hook(lambda *a: calls.append(1))
        loss = torch.nn.functional.cross_entropy(m(batch), batch["labels"])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, len(calls)

    loss_a, grads_a, calls_a = run(False)
    loss_b, grads_b, calls_b = run(True)
    assert (calls_a, calls_b) == (1, 2)  # recomputed once in backward
    torch.testing.assert_close(loss_a, loss_b)
    for n in grads_a:
        if n.startswith(("prefix", "head")):  # (adapter and LoRA terms start at zero: some grads are 0)
            assert grads_a[n].abs().sum() > 0, f"no gradient reached {n}"
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta-v2", "gpt2", "bart"])
def test_input_prompt_keeps_real_token_embeddings_and_positions(arch):
    """The real tokens' embedding-layer output (token + position embeddings) is what it is
    without a prompt: no shift of position ids by the prompt length."""
    m = build("prompt_tuning", arch).eval()
    batch = make_batch(arch, length=TINY[arch].get("max_position_embeddings", 24) - 4)
    inputs = m.backbone_inputs(batch)
    name = "encoder_hidden_states" if m.kind == "encoder-decoder" else "hidden_states"
    with torch.no_grad():
        ref = getattr(m.backbone(**inputs, output_hidden_states=True), name)[0]
        with m.input_prompt.prepended(inputs, m.prompt() * 10) as joined:
            out = getattr(m.backbone(**joined, output_hidden_states=True), name)[0]
    assert out.shape[1] == ref.shape[1] + P
    torch.testing.assert_close(out[:, P:], ref, atol=1e-6, rtol=0)
