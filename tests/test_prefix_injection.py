"""The attention-level prefix mechanism against the unmodified backbone."""
import pytest
import torch
from conftest import make_batch, max_real_length, tiny_model

from peft_lightning.backbone import BackboneSpec, load_backbone
from peft_lightning.injection import PrefixEncoder, PrefixState, install_prefix_attention
from peft_lightning.injection.prefix import PREFIX_KWARG

ARCHS = ["bert", "roberta"]
ATTN = ["sdpa", "eager"]


def pair(arch, attn):
    """(unmodified model, same weights with prefix attention installed)."""
    torch.manual_seed(0)
    base = load_backbone(BackboneSpec(**tiny_model(arch, attn))).eval()
    torch.manual_seed(0)
    injected = load_backbone(BackboneSpec(**tiny_model(arch, attn))).eval()
    injected.load_state_dict(base.state_dict())
    slots = len(install_prefix_attention(injected))
    return base, injected, slots


def layer_outputs(model, batch, **kw):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=True, **kw)
    return out.hidden_states  # embeddings, layer 0, ..., layer L-1


def encoder(slots, p=4, layers=None):
    cfg = tiny_model("bert")["config"]
    return PrefixEncoder(p, list(range(slots)) if layers is None else layers, cfg["num_attention_heads"],
                         cfg["hidden_size"] // cfg["num_attention_heads"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ATTN)
def test_installed_without_prefix_equals_base(arch, attn):
    base, injected, slots = pair(arch, attn)
    assert slots == 3
    batch = make_batch(arch)
    for a, b in zip(layer_outputs(base, batch), layer_outputs(injected, batch)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ATTN)
def test_masked_out_prefix_equals_base(arch, attn):
    base, injected, slots = pair(arch, attn)
    batch = make_batch(arch)
    with torch.no_grad():
        state = encoder(slots)(3)
        state.keys = {k: v * 50 for k, v in state.keys.items()}  # a prefix that would matter a lot
        state.mask = torch.zeros(3, 4, dtype=torch.bool)
        ref = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out = injected(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       **{PREFIX_KWARG: state}).last_hidden_state
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        # and unmasking it does change the output (the test could fail)
        state.mask = None
        out = injected(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       **{PREFIX_KWARG: state}).last_hidden_state
        assert (out - ref).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ATTN)
def test_partially_masked_prefix_is_per_example(attn):
    """Example 0 masks its prefix (equals base), example 1 keeps it (differs)."""
    base, injected, slots = pair("bert", attn)
    batch = make_batch("bert", batch=2)
    batch["attention_mask"][:] = 1
    with torch.no_grad():
        state = encoder(slots)(2)
        state.mask = torch.tensor([[False] * 4, [True] * 4])
        ref = base(input_ids=batch["input_ids"]).last_hidden_state
        out = injected(input_ids=batch["input_ids"], **{PREFIX_KWARG: state}).last_hidden_state
    torch.testing.assert_close(out[0], ref[0], atol=1e-6, rtol=0)
    assert (out[1] - ref[1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_length_prefix_equals_base(arch):
    base, injected, slots = pair(arch, "sdpa")
    batch = make_batch(arch)
    cfg = tiny_model(arch)["config"]
    h, d = cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    empty = torch.zeros(1, h, 0, d)
    state = PrefixState({s: empty for s in range(slots)}, {s: empty for s in range(slots)})
    with torch.no_grad():
        ref = base(**{k: batch[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
        out = injected(**{k: batch[k] for k in ("input_ids", "attention_mask")}, **{PREFIX_KWARG: state})
    torch.testing.assert_close(out.last_hidden_state, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
def test_sdpa_and_eager_agree_with_prefix(attn):
    _, sdpa_model, slots = pair("bert", "sdpa")
    _, eager_model, _ = pair("bert", "eager")
    batch = make_batch("bert")
    with torch.no_grad():
        state = encoder(slots)(3)
        a = sdpa_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **{PREFIX_KWARG: state})
        b = eager_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **{PREFIX_KWARG: state})
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_layer_subset_changes_only_from_first_prefixed_layer():
    base, injected, slots = pair("bert", "sdpa")
    batch = make_batch("bert")
    with torch.no_grad():
        state = encoder(slots, layers=[1])(3)
        ref = layer_outputs(base, batch)
        out = layer_outputs(injected, batch, **{PREFIX_KWARG: state})
    # hidden_states[i + 1] is layer i's output
    torch.testing.assert_close(out[0], ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], ref[1], atol=1e-6, rtol=0)  # layer 0 has no prefix
    assert (out[2] - ref[2]).abs().max() > 1e-3  # layer 1 does
    assert (out[3] - ref[3]).abs().max() > 1e-3


def test_deep_prefix_changes_every_layer():
    base, injected, slots = pair("bert", "sdpa")
    batch = make_batch("bert")
    with torch.no_grad():
        state = encoder(slots)(3)
        ref = layer_outputs(base, batch)
        out = layer_outputs(injected, batch, **{PREFIX_KWARG: state})
    torch.testing.assert_close(out[0], ref[0], atol=1e-6, rtol=0)  # embeddings untouched
    for layer in range(1, len(ref)):
        assert (out[layer] - ref[layer]).abs().max() > 1e-3, f"layer {layer - 1} unchanged"


@pytest.mark.parametrize("arch", ARCHS)
def test_max_length_sequence_with_prefix_keeps_positions(arch):
    """A max-length input runs with a long prefix; real tokens' embeddings (positions) are unchanged."""
    base, injected, slots = pair(arch, "sdpa")
    batch = make_batch(arch, batch=2, length=max_real_length(arch))
    with torch.no_grad():
        state = encoder(slots, p=40)(2)  # longer than max_position_embeddings itself
        ref = layer_outputs(base, batch)
        out = layer_outputs(injected, batch, **{PREFIX_KWARG: state})
    assert out[-1].shape == ref[-1].shape
    torch.testing.assert_close(out[0], ref[0], atol=0, rtol=0)  # same position ids
    assert torch.isfinite(out[-1]).all()
