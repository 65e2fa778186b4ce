"""The injected attention layers against an independent, hand-written attention with a prefix.

For every attention module of a tiny BERT (SDPA and eager), GPT-2 and Llama (grouped-query: 4 query
heads, 2 key/value heads) we capture the hidden states the layer receives in a real forward with a
`PrefixState`, recompute its output from the layer's own projection weights in float64:

    softmax(Q [Pk; K]^T / sqrt(d) + mask) [Pv; V]     (then the layer's output projection, if any)

with the prefix keys/values written in front, prefix columns visible to every query unless the
per-example prefix mask hides them, padding columns hidden, a causal mask among the real tokens of
the decoders only, key/value heads repeated for grouped-query attention, and, for Llama, rotary
embeddings applied to the real queries/keys at positions 0..L-1 and never to the prefix keys (they
have no position: the same as a prefix handed over as `past_key_values`, as HF peft and the
P-Tuning v2 code feed theirs, since a cache holds keys that are already rotated). Nothing here
goes through `_with_prefix` or transformers' kernels, so SDPA and eager are each checked against
the same reference, not against each other.
"""
import math

import pytest
import torch
from conftest import TINY, make_batch, tiny_model

from peft_lightning.backbone import BackboneSpec, load_backbone
from peft_lightning.injection import PrefixState, install_prefix_attention
from peft_lightning.injection.prefix import PREFIX_KWARG

P, L, B, ATOL = 5, 7, 3, 1e-5
# (query heads, key/value heads, head dim) of the tiny configs, written out by hand
GEOMETRY = {"bert": (4, 4, 8), "gpt2": (4, 4, 8), "llama": (4, 2, 8)}
CASES = [(a, attn) for a in ("bert", "gpt2", "llama") for attn in ("sdpa", "eager")]


def rotate(x, positions, theta):
    """Rotary embedding by hand (the rotate-half layout: pairs (i, i + d/2))."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(q, k, v, pk, pv, key_mask, prefix_mask, causal):
    """q (B, H, L, d); k, v (B, KV, L, d); pk, pv (B or 1, KV, P, d); key_mask (B, L) 1 = real;
    prefix_mask (B, P) bool or None. Returns (B, L, H * d)."""
    b, h, lq, d = q.shape
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], dim=-2)
    values = torch.cat([pv.expand(b, -1, -1, -1), v], dim=-2)
    keys = keys.repeat_interleave(h // keys.shape[1], dim=1)  # grouped-query: kv head j serves heads j*g..
    values = values.repeat_interleave(h // values.shape[1], dim=1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(d)
    real = key_mask.bool()[:, None, None, :].expand(b, 1, lq, k.shape[-2])
    if causal:  # among the real tokens only (the prefix is in every query's past); the queries are
        # the last lq of the real tokens (all of them, or the new ones after a cache)
        real = real & torch.ones(lq, k.shape[-2], dtype=torch.bool).tril(diagonal=k.shape[-2] - lq)
    p = pk.shape[-2]
    cols = torch.ones(b, p, dtype=torch.bool) if prefix_mask is None else prefix_mask.bool()
    allowed = torch.cat([cols[:, None, None, :].expand(b, 1, lq, p), real], dim=-1)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ values).transpose(1, 2).reshape(b, lq, h * d)


def reference(arch, module, x, pk, pv, key_mask, prefix_mask, config, rotate_prefix=False, past=None):
    """The attention module's output for input x, from its own weights, in float64. `past`: the
    layer's inputs at the earlier (cached) positions; x then holds only the new tokens."""
    h, kv, d = GEOMETRY[arch]
    start = 0 if past is None else past.shape[1]
    x_all = (x if past is None else torch.cat([past, x], dim=1)).double()
    x = x.double()
    w = {n: t.detach().double() for n, t in module.named_parameters()}
    pk, pv = pk.double(), pv.double()
    b = x.shape[0]

    def heads(t, count):
        return t.view(b, t.shape[1], count, d).transpose(1, 2)

    if arch == "bert":  # BertSelfAttention returns the context, before its output dense
        q, k, v = (heads(x @ w[f"{p}.weight"].T + w[f"{p}.bias"], h) for p in ("query", "key", "value"))
        return attention(q, k, v, pk, pv, key_mask, prefix_mask, causal=False)
    if arch == "gpt2":  # Conv1D: x @ W + b, W stored (in, out); q, k, v fused
        q = (x @ w["c_attn.weight"] + w["c_attn.bias"])[..., : h * d]
        _, k, v = (x_all @ w["c_attn.weight"] + w["c_attn.bias"]).split(h * d, dim=-1)
        out = attention(heads(q, h), heads(k, h), heads(v, h), pk, pv, key_mask, prefix_mask, causal=True)
        return out @ w["c_proj.weight"] + w["c_proj.bias"]
    assert arch == "llama"  # no biases; rotary on the real tokens at positions 0..L-1
    theta = config.rope_parameters["rope_theta"]
    positions = torch.arange(x_all.shape[1])
    q = rotate(heads(x @ w["q_proj.weight"].T, h), positions[start:], theta)
    k = rotate(heads(x_all @ w["k_proj.weight"].T, kv), positions, theta)
    v = heads(x_all @ w["v_proj.weight"].T, kv)
    if rotate_prefix:  # the alternative we do not implement: the prefix at positions 0..P-1
        pk = rotate(pk, torch.arange(pk.shape[-2]), theta)
    out = attention(q, k, v, pk, pv, key_mask, prefix_mask, causal=True)
    return out @ w["o_proj.weight"].T


def run_captured(arch, attn, state, batch, cached=0):
    """Each prefixed attention module's (input hidden states, output) in a real forward; with
    `cached`, the last `cached` tokens run as a second call on the KV cache of the first (the
    generation path) and each slot gets (its first-call input, second-call input, output)."""
    torch.manual_seed(0)
    model = load_backbone(BackboneSpec(**tiny_model(arch, attn))).eval()
    slots = install_prefix_attention(model)
    modules = [model.get_submodule(s.name) for s in slots]
    captured = {}

    def capture(i):
        def hook(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            captured.setdefault(i, []).append((x.detach(), output[0].detach()))
        return hook

    for i, m in enumerate(modules):
        m.register_forward_hook(capture(i), with_kwargs=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        if not cached:
            model(input_ids=ids, attention_mask=mask, **{PREFIX_KWARG: state})
            return model, modules, {i: (None, *c[0]) for i, c in captured.items()}
        n = ids.shape[1] - cached
        cache = model(input_ids=ids[:, :n], attention_mask=mask[:, :n], use_cache=True,
                      **{PREFIX_KWARG: state}).past_key_values
        model(input_ids=ids[:, n:], attention_mask=mask, past_key_values=cache, use_cache=True,
              **{PREFIX_KWARG: state})
    return model, modules, {i: (c[0][0], c[1][0], c[1][1]) for i, c in captured.items()}


def prefix_state(arch, slots, per_example, seed=1):
    _, kv, d = GEOMETRY[arch]
    g = torch.Generator().manual_seed(seed)
    rows = B if per_example else 1
    keys = {s: 2 * torch.randn(rows, kv, P, d, generator=g) for s in range(slots)}
    values = {s: torch.randn(rows, kv, P, d, generator=g) for s in range(slots)}
    return PrefixState(keys, values)


# cached: the generation path, decoders only (an encoder has no KV cache): the last 2 tokens on the
# cache of the others, or 1 token without padding (transformers then passes no mask at all)
CACHED = {"cached": 2, "cached-one-token-no-padding": 1}
REFERENCE_CASES = [(a, attn, case) for a, attn in CASES
                   for case in ("padded", "per-example-prefix-mask", "no-padding", *CACHED)
                   if not (case in CACHED and a == "bert")]


@pytest.mark.parametrize("arch,attn,case", REFERENCE_CASES)
def test_injected_attention_equals_hand_written_reference(arch, attn, case):
    assert TINY[arch].get("num_key_value_heads", GEOMETRY[arch][0]) == GEOMETRY[arch][1]
    batch = make_batch(arch, batch=B, length=L)  # the last example is half padding
    if case.endswith("no-padding"):  # transformers may then pass no mask: the kernel builds its own
        batch["attention_mask"][:] = 1
    masked = case == "per-example-prefix-mask"
    state = prefix_state(arch, 3, per_example=masked)
    if masked:  # some prefix columns hidden for some rows (example 0 sees its whole prefix)
        state.mask = torch.ones(B, P, dtype=torch.bool)
        state.mask[1, [0, 3]] = False
        state.mask[2, 1:] = False
    model, modules, captured = run_captured(arch, attn, state, batch, cached=CACHED.get(case, 0))
    assert len(captured) == 3
    for slot, module in enumerate(modules):
        past, x, out = captured[slot]
        pk, pv = state.keys[slot], state.values[slot]
        want = reference(arch, module, x, pk, pv, batch["attention_mask"], state.mask, model.config, past=past)
        torch.testing.assert_close(out.double(), want, atol=ATOL, rtol=ATOL, msg=lambda m: f"slot {slot}: {m}")
        # the prefix matters here, so the comparison could fail
        no_prefix = reference(arch, module, x, pk[..., :0, :], pv[..., :0, :], batch["attention_mask"],
                              None, model.config, past=past)
        assert (no_prefix - want).abs().max() > 1e-2
        if masked:  # and the mask matters: the same prefix unmasked gives other outputs for rows 1, 2
            unmasked = reference(arch, module, x, pk, pv, batch["attention_mask"], None, model.config)
            torch.testing.assert_close(unmasked[0], want[0], atol=1e-12, rtol=0)
            assert (unmasked[1:] - want[1:]).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_prefix_keys_are_not_rotated(attn):
    """The documented behaviour: prefix keys are used as given, the real tokens rotated at
    0..L-1. A reference that rotates the prefix disagrees, so the check above tells them apart."""
    batch = make_batch("llama", batch=B, length=L)
    state = prefix_state("llama", 3, per_example=False)
    model, modules, captured = run_captured("llama", attn, state, batch)
    _, x, out = captured[0]
    args = (x, state.keys[0], state.values[0], batch["attention_mask"], None, model.config)
    torch.testing.assert_close(out.double(), reference("llama", modules[0], *args), atol=ATOL, rtol=ATOL)
    rotated = reference("llama", modules[0], *args, rotate_prefix=True)
    assert (out.double() - rotated).abs().max() > 1e-2
