"""The prefix speedups compute what the code before them computed (issue 15, item 5).

Each speedup is checked against the path it replaced, kept here as the reference: the prefix
state built from the flat table (view, permute, index per slot) and the extended attention mask
rebuilt in every layer. Outputs and gradients must be bit-identical on every architecture that
takes prefixes; the claims about work (one mask per forward, no copies of the table) are counted.
"""
import copy
import json

import pytest
import torch
from conftest import ARCHS, make_batch, tiny_model
from safetensors.torch import save_file

from peft_lightning.checkpoint import load_pretrained, save_pretrained
from peft_lightning.injection import prefix as prefix_module
from peft_lightning.injection.prefix import PrefixState, _prefix_columns, extend_attention_mask
from peft_lightning.injection.prefix_encoder import (KVPrompt, PrefixEncoder, flat_to_kv, kv_optimizer_state,
                                                     kv_to_flat)
from peft_lightning.methods import METHODS
from peft_lightning.serving import MultiTaskModel


# --- the replaced paths -------------------------------------------------------------------------
def legacy_prefix_forward(self, batch_size, mask=None):
    """PrefixEncoder.forward before the key/value layout: the flat (P, S*2*H*D) table viewed,
    permuted and indexed per slot."""
    flat = self.encoder() if not isinstance(self.encoder, KVPrompt) else kv_to_flat(self.encoder.kv())
    kv = flat.view(self.prefix_length, len(self.slots), 2, self.kv_heads, self.head_dim)
    kv = kv.permute(1, 2, 3, 0, 4)[None]
    if self.training and self.dropout.p > 0:
        kv = self.dropout(kv.expand(batch_size, -1, -1, -1, -1, -1))
    keys = {slot: kv[:, i, 0] for i, slot in enumerate(self.slots)}
    values = {slot: kv[:, i, 1] for i, slot in enumerate(self.slots)}
    return PrefixState(keys, values, mask)


def legacy_extended_mask(self, attention_mask, batch, query_len, key_len, causal, dtype, additive, device,
                         as_bool=False):
    """The mask extension as every layer ran it before: rebuilt on each call."""
    real = attention_mask.bool() if as_bool else attention_mask
    return extend_attention_mask(real, _prefix_columns(self, batch, device), query_len, key_len, causal, dtype,
                                 additive)


def module(arch, attn=None, config=None, **method):
    torch.manual_seed(0)
    cfg = dict(name="ptuning_v2", prefix_length=3, depth="deep", prefix_dropout=0.0, head={"dropout": 0.0})
    cfg.update(method)
    model = tiny_model(arch, attn)
    model["config"].update(config or {})
    return METHODS[cfg["name"]](model=model, method=cfg, num_labels=2)


def run(m, batch, seed=1):
    """Logits and the gradients of every trainable tensor (flat, as saved) after one backward."""
    m.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks on both paths
    logits = m(batch)
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    grads = {}
    for name, p in m.named_parameters():
        if p.requires_grad:
            g = p.grad
            grads[name] = kv_to_flat(g) if g is not None and g.dim() == 5 else g
    return logits.detach(), grads


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert (ga[name] is None) == (gb[name] is None), name
        if ga[name] is not None:
            assert torch.equal(ga[name], gb[name]), name


CASES = [(arch, "sdpa") for arch in ARCHS] + [(arch, "eager") for arch in ("bert", "gpt2", "llama", "t5", "bart")]


@pytest.mark.parametrize("arch,attn", CASES)
def test_outputs_and_gradients_equal_the_replaced_path(arch, attn, monkeypatch):
    """Training mode, prefix dropout on, padded rows: logits and every gradient bit-identical."""
    m = module(arch, attn if arch != "deberta-v2" else None, prefix_dropout=0.2).train()
    batch = make_batch(arch, length=8)
    new = run(m, batch)
    monkeypatch.setattr(PrefixEncoder, "forward", legacy_prefix_forward)
    monkeypatch.setattr(PrefixState, "extended_mask", legacy_extended_mask)
    assert_same(new, run(m, batch))


@pytest.mark.parametrize("reparameterization", ["mlp", "lstm"])
def test_reparameterized_prefixes_equal_the_replaced_path(reparameterization, monkeypatch):
    m = module("bert", name="prefix_tuning", reparameterization=reparameterization, reparam_hidden=16).train()
    batch = make_batch("bert", length=8)
    new = run(m, batch)
    monkeypatch.setattr(PrefixEncoder, "forward", legacy_prefix_forward)
    monkeypatch.setattr(PrefixState, "extended_mask", legacy_extended_mask)
    assert_same(new, run(m, batch))


def count_mask_builds(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return extend_attention_mask(*args, **kwargs)

    monkeypatch.setattr(prefix_module, "extend_attention_mask", counted)
    return calls


# distinct real masks per forward: encoder self-attention; encoder-decoders add decoder
# self-attention and cross-attention
MASKS = {"t5": 3, "bart": 3}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_extended_mask_is_built_once_per_forward(arch, monkeypatch):
    """One build per distinct real mask, not one per layer (3 layers here: 3 builds, 9 for the
    encoder-decoders, before)."""
    m = module(arch).eval()
    calls = count_mask_builds(monkeypatch)
    with torch.no_grad():
        m(make_batch(arch, length=8))
    assert len(calls) == MASKS.get(arch, 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_layer_gets_the_same_extended_mask(attn, monkeypatch):
    m = module("bert", attn).eval()
    seen = []
    kernel = "sdpa_attention_forward" if attn == "sdpa" else None
    if kernel:
        original = prefix_module.sdpa_attention_forward

        def spy(module_, query, key, value, attention_mask, **kwargs):
            seen.append(attention_mask)
            return original(module_, query, key, value, attention_mask, **kwargs)

        monkeypatch.setattr(prefix_module, kernel, spy)
    else:
        original = prefix_module._with_prefix

        def spy(*args, **kwargs):
            out = original(*args, **kwargs)
            seen.append(out[2])
            return out

        monkeypatch.setattr(prefix_module, "_with_prefix", spy)
    with torch.no_grad():
        m(make_batch("bert", length=8))
    assert len(seen) == 3 and all(s is seen[0] for s in seen)
    assert seen[0].shape[-1] == 3 + 8  # (the prefix columns are in it)


@pytest.mark.parametrize("arch", ["bert", "deberta-v2"])
def test_checkpointed_recomputation_reuses_the_mask_and_gives_the_same_gradients(arch, monkeypatch):
    plain = module(arch).train()
    batch = make_batch(arch, length=8)
    reference = run(plain, batch)
    m = module(arch, activation_checkpointing=True).train()
    calls = count_mask_builds(monkeypatch)
    assert_same(run(m, batch), reference)
    assert len(calls) == 1  # the forward's build; the backward's recomputation found it


def test_a_changed_mask_is_not_served_from_the_cache():
    """Reusing one state with another mask (or modifying a mask in place) rebuilds."""
    state = PrefixEncoder(2, [0], 1, 4)(1)
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    first = state.extended_mask(mask, 2, 3, 3, False, torch.float32, False, "cpu")
    assert state.extended_mask(mask, 2, 3, 3, False, torch.float32, False, "cpu") is first
    mask[1, ..., 2] = False
    changed = state.extended_mask(mask, 2, 3, 3, False, torch.float32, False, "cpu")
    assert changed is not first and not changed[1, 0, 0, 4]
    state.mask = torch.tensor([[True, False]])
    assert not state.extended_mask(mask, 2, 3, 3, False, torch.float32, False, "cpu")[0, 0, 0, 1]
    for step in range(20):  # a state reused across many forwards keeps a bounded number of masks
        state.extended_mask(torch.ones(1, 1, 1, step + 1, dtype=torch.bool), 1, 1, step + 1, False,
                            torch.float32, False, "cpu")
    assert len(state._masks) == prefix_module._MASKS_KEPT


# --- the key/value layout -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_prefix_keys_and_values_are_contiguous_views_of_the_parameter(arch):
    m = module(arch)
    weight = m.prefix.encoder.embedding.weight
    state = m.prefix(4)
    start, end = weight.data_ptr(), weight.data_ptr() + weight.numel() * weight.element_size()
    for t in [*state.keys.values(), *state.values.values()]:
        assert t.is_contiguous() and t.shape[0] == 1  # broadcast over the batch, not copied
        assert start <= t.data_ptr() < end and t.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()


def test_the_table_is_drawn_and_saved_in_the_flat_layout(tmp_path, monkeypatch):
    """The same numbers as before for a seed (random and uniform init), saved flat: an adapter
    file and an export hold the pre-change tensor bit for bit."""
    for init in ("random", "uniform"):
        new = module("bert", init=init)
        with monkeypatch.context() as patch:
            patch.setattr(PrefixEncoder, "_to_kv_layout", lambda self: None)  # the flat table, as before
            old = module("bert", init=init)
        flat = old.prefix.encoder.embedding.weight.detach()
        assert flat.shape == (3, 3 * 2 * 32)
        assert torch.equal(kv_to_flat(new.prefix.encoder.kv().detach()), flat)
        assert torch.equal(new.state_dict()["prefix.encoder.embedding.weight"], flat)
        assert torch.equal(new.prefix.encoder(), flat)  # what export_peft writes as prompt_embeddings
    from safetensors.torch import load_file

    save_pretrained(new, tmp_path / "a")
    assert torch.equal(load_file(str(tmp_path / "a/adapter_model.safetensors"))["prefix.encoder.embedding.weight"],
                       flat)


def test_an_adapter_in_the_flat_layout_loads_to_identical_logits(tmp_path, monkeypatch):
    """An adapter written before the layout change, made by hand: a flat table (token -> layer,
    key|value, head, head_dim), a head, its config."""
    P, layers, hidden = 3, 3, 32
    directory = tmp_path / "old"
    directory.mkdir()
    g = torch.Generator().manual_seed(7)
    tensors = {"prefix.encoder.embedding.weight": torch.randn(P, layers * 2 * hidden, generator=g),
               "head.linear.weight": torch.randn(2, hidden, generator=g), "head.linear.bias": torch.randn(2, generator=g)}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    torch.manual_seed(0)
    backbone = module("bert").backbone
    from safetensors.torch import save_model

    save_model(backbone, str(directory / "backbone_model.safetensors"))
    method = dict(name="ptuning_v2", prefix_length=P, depth="deep", reparameterization="none", head={"dropout": 0.0})
    (directory / "adapter_config.json").write_text(json.dumps(
        {"model": tiny_model("bert"), "num_labels": 2, "labels": None, "task": None, "method": method}))
    loaded = load_pretrained(directory)
    batch = make_batch("bert", length=8)
    with torch.no_grad():
        logits = loaded(batch)
        # the pre-change path on the file's flat table
        monkeypatch.setattr(PrefixEncoder, "forward", legacy_prefix_forward)
        monkeypatch.setattr(PrefixState, "extended_mask", legacy_extended_mask)
        monkeypatch.setattr(KVPrompt, "kv", lambda self: flat_to_kv(tensors["prefix.encoder.embedding.weight"], 3, 4, 8))
        assert torch.equal(logits, loaded(batch))
    assert torch.equal(loaded.state_dict()["prefix.encoder.embedding.weight"], tensors["prefix.encoder.embedding.weight"])


def test_a_flat_optimizer_state_resumes_exactly():
    """AdamW on the key/value-layout table follows the flat table's trajectory bit for bit, writes
    its moments flat (as before), and resumes from moments written before the change."""
    batch = make_batch("bert", length=8)

    def step(m, opt, legacy, flat):
        """One step of both: the module's gradient, handed flat to the pre-change optimizer."""
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(batch), batch["labels"]).backward()
        flat.grad = kv_to_flat(m.prefix.encoder.kv().grad)
        opt.step()
        legacy.step()
        assert torch.equal(kv_to_flat(m.prefix.encoder.kv().detach()), flat.detach())

    def optimizer(m):
        opt = torch.optim.AdamW([m.prefix.encoder.kv()], lr=1e-2)
        kv_optimizer_state(opt, m.prefix.encoder.embedding)
        return opt

    m = module("bert").train()
    opt = optimizer(m)
    flat = kv_to_flat(m.prefix.encoder.kv().detach()).requires_grad_()
    legacy = torch.optim.AdamW([flat], lr=1e-2)
    for _ in range(2):
        step(m, opt, legacy, flat)
    saved, before = opt.state_dict()["state"][0], legacy.state_dict()["state"][0]
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in saved)
    assert saved["exp_avg"].shape == (3, 3 * 2 * 32)
    # a fresh module and optimizer resumed from the pre-change optimizer state
    resumed = module("bert").train()
    resumed.load_state_dict({"prefix.encoder.embedding.weight": flat.detach().clone()}, strict=False)
    opt = optimizer(resumed)
    opt.load_state_dict(copy.deepcopy(legacy.state_dict()))  # (as read from a file: nothing shared)
    assert opt.state[resumed.prefix.encoder.kv()]["exp_avg"].shape == (3, 2, 4, 3, 8)
    step(resumed, opt, legacy, flat)


# --- serving ------------------------------------------------------------------------------------
def saved(tmp_path, seed, **method):
    m = module("bert", **method)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    save_pretrained(m, tmp_path / str(seed))
    return m.eval(), tmp_path / str(seed)


@pytest.mark.parametrize("pad", [True, False])
def test_serving_a_one_task_batch_takes_the_fast_path_and_computes_the_same(tmp_path, pad, monkeypatch):
    """A batch of one task: no per-row gather; the same logits as the general path (exactly,
    for the longest prefix; a shorter one drops its masked padding: 1e-6) and exactly the task's
    own module's."""
    a, dir_a = saved(tmp_path, 1, prefix_length=5)
    b, dir_b = saved(tmp_path, 2, name="prefix_tuning", prefix_length=3, reparameterization="mlp", reparam_hidden=8)
    served = MultiTaskModel({"a": dir_a, "b": dir_b})
    batch = make_batch("bert", batch=4, length=8, seed=3)
    if not pad:
        batch["attention_mask"][:] = 1
    gathers = []
    general_prefix = MultiTaskModel.prefix_for
    monkeypatch.setattr(MultiTaskModel, "prefix_for", lambda self, i: gathers.append(i) or general_prefix(self, i))
    for task, alone in (("a", a), ("b", b)):
        fast = torch.stack(served(batch, [task] * 4))
        assert not gathers
        with torch.no_grad():
            hidden = served.run_backbone(batch, prefix=general_prefix(served, served.task_index([task] * 4)))
            general = served.heads[task](hidden, batch["attention_mask"])
            assert torch.equal(fast, alone(batch))
        if task == "a":
            assert torch.equal(fast, general)
        else:
            torch.testing.assert_close(fast, general, atol=1e-6, rtol=0)


def test_serving_a_mixed_batch_equals_the_per_task_loop_exactly(tmp_path):
    a, dir_a = saved(tmp_path, 1, prefix_length=5)
    b, dir_b = saved(tmp_path, 2, prefix_length=3)
    served = MultiTaskModel({"a": dir_a, "b": dir_b})
    batch = make_batch("bert", batch=5, length=8, seed=3)
    tasks = ["b", "a", "b", "b", "a"]
    out = served(batch, tasks)
    index = served.task_index(tasks)
    with torch.no_grad():  # the loop it replaced: each task's rows gathered, its head, row by row
        hidden = served.run_backbone(batch, prefix=served.prefix_for(index))
        for t, task in enumerate(served.tasks):
            rows = (index == t).nonzero().flatten()
            for row, value in zip(rows.tolist(), served.heads[task](hidden[rows], batch["attention_mask"][rows])):
                assert torch.equal(out[row], value)


def test_masks_made_under_inference_mode_work():
    """Lightning evaluates under inference_mode: its masks are inference tensors, which have no
    version counter (the mask memo must not ask for one)."""
    m = module("bert").eval()
    batch = make_batch("bert", length=8)
    with torch.no_grad():
        expected = m(batch)
    with torch.inference_mode():
        assert torch.equal(m(batch), expected)


# --- recomputing only the attention -------------------------------------------------------------
RECOMPUTE = [("bert", "sdpa"), ("bert", "eager"), ("gpt2", "sdpa"), ("llama", "eager"), ("t5", "sdpa"), ("bart", "sdpa")]
# the tiny models' dropout (off in conftest), attention dropout included
DROPOUT = {"bert": dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
           "gpt2": dict(resid_pdrop=0.1, attn_pdrop=0.1), "llama": dict(attention_dropout=0.1),
           "t5": dict(dropout_rate=0.1), "bart": dict(dropout=0.1, attention_dropout=0.1)}


@pytest.mark.parametrize("arch,attn", RECOMPUTE)
def test_recomputing_the_attention_gives_the_same_outputs_and_gradients(arch, attn):
    """With the backbone's dropout on (attention dropout too: the mask is redrawn identically)."""
    batch = make_batch(arch, length=8)
    on = dict(config=DROPOUT[arch], backbone_dropout=True, prefix_dropout=0.1)
    kept = run(module(arch, attn, **on).train(), batch)
    assert_same(run(module(arch, attn, recompute_attention=True, **on).train(), batch), kept)


def attention_sized_saves(m, batch, P=3):
    """Tensors the backward keeps of the attention-internals' shape (batch, heads, L, P + L)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(m(batch), batch["labels"])
    loss.backward()
    B, L = batch["input_ids"].shape
    return sum(s == (B, 4, L, P + L) for s in shapes)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_recomputing_the_attention_keeps_none_of_its_internals(attn):
    """The math SDPA kernel (dropout on) and the eager kernel store scores, probabilities and
    dropout masks per layer; with the option, none (3 layers)."""
    batch = make_batch("bert", length=8)
    on = dict(config=DROPOUT["bert"], backbone_dropout=True)
    assert attention_sized_saves(module("bert", attn, **on).train(), batch) >= 3
    assert attention_sized_saves(module("bert", attn, recompute_attention=True, **on).train(), batch) == 0


@pytest.mark.parametrize("change,message", [
    (dict(activation_checkpointing=True), "pick one"),
    (dict(depth="embedding", name="prompt_tuning"), "needs deep prefixes"),
    (dict(arch="deberta-v2"), "not supported for deberta-v2"),
])
def test_recomputing_the_attention_refuses_what_it_cannot_do(change, message):
    from peft_lightning.errors import ConfigError

    change = dict(change)
    with pytest.raises(ConfigError, match=message):
        module(change.pop("arch", "bert"), recompute_attention=True, **change)


def test_a_compiled_prefix_model_computes_the_eager_logits_and_gradients_without_breaking_in_the_injection():
    """torch.compile (issue 15, item 5): the mask cache's identity and version checks cannot be
    traced, so a compiled graph builds the mask per layer instead; the values are the eager ones, and
    no graph break comes from peft_lightning's own code (before, one in every layer)."""
    import torch._dynamo

    m = module("bert", "sdpa").train()
    batch = make_batch("bert", length=8)
    eager = run(m, batch)
    m.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(m)(batch)
    ours = [r for r in explained.break_reasons
            if any("peft_lightning" in frame.filename for frame in r.user_stack)]
    assert not ours, [r.reason for r in ours]
    compiled = torch.compile(m)
    logits = compiled(batch)
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    torch.testing.assert_close(logits.detach(), eager[0], rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        ref = eager[1][name]
        torch.testing.assert_close(kv_to_flat(g) if g.dim() == 5 else g, ref, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
