"""The frozen-layer cache (issue 15, item 6): with prompts from layer k on, layers < k run once per
example; later epochs give the logits, gradients and losses of the uncached run."""
import logging

import lightning as L
import pytest
import torch
from conftest import TINY, make_batch, tiny_model

from peft_lightning.errors import ConfigError
from peft_lightning.injection.prefix import PREFIX_KWARG
from peft_lightning.methods import METHODS


def module(arch="bert", cache=True, **method):
    torch.manual_seed(0)
    cfg = dict(name="ptuning_v2", prefix_length=3, depth=[2], prefix_dropout=0.1, cache_frozen_layers=cache,
               head={"dropout": 0.1})
    cfg.update(method)
    return METHODS[cfg["name"]](model=tiny_model(arch), method=cfg, num_labels=2)


def examples(arch, n=12, seed=0):
    """Rows of different lengths (4..10 tokens), some with token types."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, TINY[arch]["vocab_size"], (int(length),), generator=g),
             "token_type_ids": (torch.arange(int(length)) >= int(length) // 2).long(),
             "labels": torch.randint(0, 2, (), generator=g)}
            for length in torch.randint(4, 11, (n,), generator=g)]


def collate(rows, arch="bert"):
    """Right padding to the longest row, with the model's pad id."""
    pad = TINY[arch].get("pad_token_id", 0)
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    types = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n], types[i, :n] = r["input_ids"], 1, r["token_type_ids"]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels": torch.stack([r["labels"] for r in rows])}


def epochs(arch, data, count=2, size=4):
    """`count` epochs of batches, each epoch in another order (so other rows share a batch and
    the padded lengths change)."""
    out = []
    for epoch in range(count):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)).tolist()
        out.append([collate([data[i] for i in order[j:j + size]], arch) for j in range(0, len(order), size)])
    return out


def step(m, opt, batch, seed):
    """One training step; returns logits and the gradients of the trainable tensors."""
    torch.manual_seed(seed)  # prefix and head dropout: the same masks on both runs
    opt.zero_grad()
    logits = m(batch)
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    opt.step()
    return logits.detach(), grads


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_cached_epochs_give_the_uncached_logits_and_gradients(arch):
    """depth [2] of 3 layers, two epochs of three batches: the second epoch is served from the
    cache (every row a hit) and matches the uncached run to 1e-6 at every step."""
    cached, plain = module(arch, cache=True).train(), module(arch, cache=False).train()
    assert cached.frozen_cache is not None and plain.frozen_cache is None
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (cached, plain)]
    data = examples(arch)
    for epoch, batches in enumerate(epochs(arch, data)):
        hits = cached.frozen_cache.hits
        for i, batch in enumerate(batches):
            a, ga = step(cached, opts[0], batch, seed=10 * epoch + i)
            b, gb = step(plain, opts[1], batch, seed=10 * epoch + i)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
            for name in ga:
                torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=0)
        if epoch == 0:
            assert cached.frozen_cache.hits == 0 and cached.frozen_cache.stored == len(data)
        else:
            assert cached.frozen_cache.hits - hits == len(data) and cached.frozen_cache.stored == len(data)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_top_layers_run_exactly_as_the_models_own_forward(arch):
    """A hit on the same batch as the miss: bit-identical real-token states (padding positions are
    not computed from the real pads, and nothing reads them)."""
    m = module(arch).eval()
    batch = collate(examples(arch)[:4], arch)
    inputs = m.backbone_inputs(batch)
    with torch.no_grad():
        prefix = m.prefix(1)
        reference = m.backbone(**inputs, **{PREFIX_KWARG: prefix}).last_hidden_state
        m.frozen_cache(inputs, store=True, **{PREFIX_KWARG: prefix})
        hits = m.frozen_cache.hits
        served = m.frozen_cache(inputs, store=True, **{PREFIX_KWARG: prefix})
    assert m.frozen_cache.hits - hits == 4
    real = batch["attention_mask"].bool()
    assert torch.equal(served[real], reference[real])


def test_the_same_example_padded_otherwise_is_a_hit():
    m = module().eval()
    rows = examples("bert")[:2]
    short, long = collate(rows), collate(rows + [{**rows[0], "input_ids": torch.arange(5, 20),
                                                   "token_type_ids": torch.zeros(15, dtype=torch.long)}])
    with torch.no_grad():
        m.frozen_cache(m.backbone_inputs(long), **{PREFIX_KWARG: m.prefix(1)})
        assert m.frozen_cache.stored == 3
        m.frozen_cache(m.backbone_inputs(short), **{PREFIX_KWARG: m.prefix(1)})
    assert m.frozen_cache.hits == 2 and m.frozen_cache.stored == 3


def test_a_changed_frozen_weight_clears_the_cache():
    m = module(prefix_dropout=0.0, head={"dropout": 0.0}).train()  # (training: what is stored)
    batch = collate(examples("bert")[:4])
    with torch.no_grad():
        m(batch)
        m(batch)
        assert m.frozen_cache.hits == 4
        m.backbone.encoder.layer[0].output.dense.weight.mul_(1.5)  # e.g. a weight loaded in place
        served = m(batch)
        assert m.frozen_cache.hits == 4 and m.frozen_cache.stored == 8  # recomputed, not served
        off = module(cache=False, prefix_dropout=0.0, head={"dropout": 0.0})
        off.load_state_dict(m.state_dict())
        torch.testing.assert_close(served, off.train()(batch), atol=1e-6, rtol=0)


def test_evaluation_outside_training_reads_but_does_not_store():
    m = module().eval()
    batch = collate(examples("bert")[:4])
    with torch.no_grad():
        m(batch)
        assert m.frozen_cache.entries == {}
        m.train()(batch)
        m.eval()(batch)
    assert m.frozen_cache.hits == 4


def test_dropout_turns_the_cache_off(caplog):
    with caplog.at_level(logging.INFO, logger="peft_lightning.methods.prompting"):
        assert module(cache="auto", backbone_dropout=True).frozen_cache is None
    assert "backbone_dropout is on" in caplog.text
    with pytest.raises(ConfigError, match="cache_frozen_layers=true cannot be used here: backbone_dropout"):
        module(cache=True, backbone_dropout=True)
    # a backbone put in training mode by hand (its dropout active): run uncached, store nothing
    m = module(cache=True)
    m.train()
    m.backbone.train()
    for layer in m.backbone.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.1
    m(collate(examples("bert")[:4]))
    assert m.frozen_cache.entries == {} and m.frozen_cache.hits == 0


@pytest.mark.parametrize("change,reason", [
    (dict(depth="deep"), "start at layer 0"),
    (dict(depth=[0, 2]), "start at layer 0"),
    (dict(activation_checkpointing=True), "activation checkpointing"),
    (dict(arch="gpt2"), "not a supported encoder"),
])
def test_where_the_cache_is_not_valid_auto_leaves_it_off_and_true_refuses(change, reason):
    change = dict(change)
    arch = change.pop("arch", "bert")
    assert module(arch, cache="auto", **change).frozen_cache is None
    with pytest.raises(ConfigError, match=reason):
        module(arch, cache=True, **change)


def test_a_method_that_changes_the_lower_layers_is_refused(monkeypatch):
    """UniPELT (adapters and LoRA in every layer, its own forward) is refused; and whatever hooks
    a module below k after build is found at the first forward."""
    assert module(name="unipelt", cache="auto", bottleneck=4, r=2).frozen_cache is None
    with pytest.raises(ConfigError, match="method=unipelt runs the backbone its own way"):
        module(name="unipelt", cache=True, bottleneck=4, r=2)
    batch = make_batch("bert", length=8)
    for setting in ("auto", True):
        m = module(cache=setting)
        m.backbone.encoder.layer[1].output.register_forward_hook(lambda *a: None)
        if setting == "auto":
            m(batch)
            assert m.frozen_cache is None
        else:
            with pytest.raises(ConfigError, match="below layer 2 is hooked"):
                m(batch)


def test_a_changed_private_signature_turns_the_cache_off(monkeypatch):
    """The cache calls two private transformers internals positionally; a release that reorders their
    parameters must turn the cache off (auto) or be refused (true), never run with arguments misplaced."""
    import functools
    import inspect

    from transformers.models.bert.modeling_bert import BertModel

    stock = BertModel._create_attention_masks
    reordered = functools.wraps(stock)(lambda *a, **k: stock(*a, **k))  # the model's own forward still works
    reordered.__signature__ = inspect.signature(
        lambda self, embedding_output, attention_mask, encoder_attention_mask, encoder_hidden_states, cache: None)
    monkeypatch.setattr(BertModel, "_create_attention_masks", reordered)
    assert module(cache="auto").frozen_cache is None
    with pytest.raises(ConfigError, match="not the signature this transformers version was checked with"):
        module(cache=True)


def test_bad_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="auto, true or false"):
        module(cache="sometimes")


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def fit(cache):
    data = examples("bert", n=16)
    m = module(cache=cache, optim={"lr": 1e-2})
    L.seed_everything(0)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(data[:8], batch_size=4, collate_fn=collate)
    losses = Losses()
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[losses], accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(m, loader, val)
    return losses.losses, trainer.callback_metrics, m.frozen_cache


def test_a_lightning_fit_gives_the_same_losses_with_the_cache():
    cached, metrics, cache = fit(True)
    plain, plain_metrics, _ = fit(False)
    assert len(cached) == 12
    assert cache.hits == 2 * 16 + 3 * 8  # epochs 2 and 3 from the cache; validation from epoch 1's
    assert cached == plain  # bit for bit (this CPU; at worst 1e-6 elsewhere: see the test above)
    for key in ("val/acc", "val/loss"):
        torch.testing.assert_close(metrics[key], plain_metrics[key], atol=1e-6, rtol=0)


def test_states_stored_under_inference_mode_serve_training():
    """Validation (inference_mode in Lightning) stores states that training then reads with
    gradients on: they are stored as ordinary tensors."""
    m = module(prefix_dropout=0.0, head={"dropout": 0.0})
    batch = collate(examples("bert")[:4])
    with torch.inference_mode():
        m.frozen_cache(m.backbone_inputs(batch), store=True, **{PREFIX_KWARG: m.prefix(1)})
    m.train()
    logits = m(batch)
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    assert m.frozen_cache.hits == 4 and m.prefix.encoder.kv().grad.abs().sum() > 0
    off = module(cache=False, prefix_dropout=0.0, head={"dropout": 0.0}).train()
    torch.testing.assert_close(logits, off(batch), atol=1e-6, rtol=0)
