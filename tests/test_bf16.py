"""The bf16 path (trainer=gpu is bf16-mixed) exercised on CPU: every prompt method trains under bf16
autocast, the prefix reaches attention in the activations' dtype, and Lightning's bf16-mixed runs."""
import functools
import sys

import lightning as L
import pytest
import torch
from conftest import make_batch, tiny_model
from torch.utils.data import DataLoader
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from peft_lightning.injection import prefix
from peft_lightning.methods import METHODS

PROMPT_METHODS = {
    "ptuning_v2": dict(depth="deep", reparameterization="none"),
    "prefix_tuning": dict(depth="deep", reparameterization="mlp"),
    "prompt_tuning": dict(depth="embedding", reparameterization="none", init="uniform"),
    "p_tuning": dict(depth="embedding", reparameterization="lstm"),
    "unipelt": dict(depth="deep", reparameterization="mlp", bottleneck=8, r=4),
}
P, LENGTH = 4, 8


def build(name, arch, attn):
    cfg = dict(name=name, prefix_length=P, reparam_hidden=16, prefix_dropout=0.0, head={"dropout": 0.0},
               optim={"lr": 1e-2}, **PROMPT_METHODS[name])
    return METHODS[name](model=tiny_model(arch, attn), method=cfg, num_labels=2)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call of an attention kernel: (query, key, value) dtypes and key length. Wraps the stock SDPA
    (models call it through ALL_ATTENTION_FUNCTIONS, our prefix kernel directly) and each model's eager kernel."""
    calls = []

    def recording(fn):
        @functools.wraps(fn)  # (keeps the signature compat.py checks)
        def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
            calls.append((query.dtype, key.dtype, value.dtype, key.shape[-2], key[..., :P, :].detach().clone()))
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(prefix, "sdpa_attention_forward", recording(prefix.sdpa_attention_forward))
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", recording(ALL_ATTENTION_FUNCTIONS["sdpa"]))
    for name in ("transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama"):
        __import__(name)
        monkeypatch.setattr(sys.modules[name], "eager_attention_forward",
                            recording(sys.modules[name].eager_attention_forward))
    return calls


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("name", list(PROMPT_METHODS))
def test_prompt_method_trains_under_bf16_autocast(name, arch, attn, kernel_calls):
    m = build(name, arch, attn)
    kernel_calls.clear()  # (the build's self-check, in float32)
    batch = make_batch(arch, length=LENGTH)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the frozen backbone's own dtypes
        m.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    stock = {c[:3] for c in kernel_calls}  # (Llama's depend on the transformers release: 5.24 casts values to
    kernel_calls.clear()                   # bf16, 5.20-5.23 keep all three float32 under CPU autocast)

    trainable = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the prompt (deep prefix or input prompt) reached every attention call, in the activations' dtypes:
    # exactly those the frozen backbone's kernel gets (values bf16; Llama's RoPE'd queries/keys come out
    # of a float32 rotation, for the stock model as for ours)
    assert kernel_calls and all(c[3] == P + LENGTH for c in kernel_calls)
    assert {c[:3] for c in kernel_calls} == stock
    if arch == "bert":
        assert stock == {(torch.bfloat16,) * 3}
    assert all(torch.isfinite(c[4]).all() and c[4].abs().max() > 0 for c in kernel_calls)
    for n, before in trainable.items():
        assert not torch.equal(before, dict(m.named_parameters())[n]), f"{n} did not train"


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_hooked_methods_keep_the_activations_dtype_under_bf16_autocast(name, arch, kernel_calls):
    """DoRA's float32 magnitudes and (IA)^3's float32 vectors must not promote the projections' bf16
    outputs: attention gets exactly the dtypes the frozen backbone's kernel gets, and they train."""
    batch = make_batch(arch, length=LENGTH)
    base = METHODS["finetune"](model=tiny_model(arch, "sdpa"), method=dict(name="finetune"), num_labels=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the stock kernels' dtypes, no hooks
        base.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    stock = {c[:3] for c in kernel_calls}
    kernel_calls.clear()
    m = METHODS[name](model=tiny_model(arch, "sdpa"), method=dict(name=name, r=4, head={"dropout": 0.0}),
                      num_labels=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for p in m.parameters():  # off their identity start (DoRA's B stays 0): the hooks really compute
            if p.requires_grad:
                p.mul_(1.5)
        m.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # exactly the stock kernels' dtypes (BERT: all bf16; Llama: what this transformers release gives)
    assert {c[:3] for c in kernel_calls} == stock
    if arch == "bert":
        assert stock == {(torch.bfloat16,) * 3}
    trainable = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(batch).float(), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, before in trainable.items():
        assert not torch.equal(before, dict(m.named_parameters())[n]), f"{n} did not train"


class _Batches(torch.utils.data.Dataset):
    def __init__(self, arch, n=2):
        self.items = [make_batch(arch, length=LENGTH, seed=i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("name,arch", [("ptuning_v2", "bert"), ("prefix_tuning", "llama")])
def test_lightning_bf16_mixed_on_cpu(name, arch, tmp_path):
    """What trainer=gpu runs (precision bf16-mixed), on the CPU accelerator, 2 steps through the module."""
    m = build(name, arch, None)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())

    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=[Record()])
    trainer.fit(m, DataLoader(_Batches(arch), batch_size=None))
    assert trainer.global_step == 2 and len(losses) == 2
    assert all(torch.isfinite(x) for x in losses)
    for n, p in m.named_parameters():
        if n in before:
            assert p.dtype == torch.float32  # mixed precision: the trained weights stay float32
            assert not torch.equal(before[n], p), f"{n} did not train"
