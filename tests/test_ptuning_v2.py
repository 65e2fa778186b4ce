"""P-Tuning v2 as a LightningModule: parameter formula, frozen backbone, depth, checkpointing."""
import lightning as L
import pytest
import torch
from conftest import make_batch, max_real_length, tiny_model, train_steps
from torch.utils.data import DataLoader

from peft_lightning.checkpoint import load_pretrained, save_pretrained
from peft_lightning.methods import PTuningV2
from peft_lightning.backbone import checkpointing as checkpointing_on


def module(arch="bert", **method):
    cfg = dict(name="ptuning_v2", prefix_length=4, depth="deep", reparameterization="none", reparam_hidden=16,
               prefix_dropout=0.0, head={"dropout": 0.0}, optim={"lr": 1e-2})
    cfg.update(method)
    return PTuningV2(model=tiny_model(arch), method=cfg, num_labels=2)


def expected_trainable(P, layers, hidden, labels=2, reparam="none", h=16, embedding_only=False):
    """The formula documented in peft_lightning/methods/ptuning_v2.py."""
    out = hidden if embedding_only else 2 * layers * hidden
    head = hidden * labels + labels
    if reparam == "none":
        return P * out + head
    return P * hidden + (hidden * h + h) + (h * out + out) + head


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("depth,layers", [("deep", 3), ([0, 2], 2), ("embedding", 0)])
@pytest.mark.parametrize("reparam", ["none", "mlp"])
def test_trainable_count_matches_formula(arch, depth, layers, reparam):
    m = module(arch, depth=depth, reparameterization=reparam)
    want = expected_trainable(4, layers, 32, reparam=reparam, embedding_only=depth == "embedding")
    assert m.parameter_counts()["trainable"] == want
    # only the method's modules and the head train
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"head", "prompt" if depth == "embedding" else "prefix"}


@pytest.mark.parametrize("depth", ["deep", "embedding", [1]])
def test_backbone_bit_identical_after_training_and_loss_falls(depth):
    m = module(depth=depth)
    frozen = {n: p.detach().clone() for n, p in m.backbone.named_parameters()}
    trained_before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    batch = make_batch(length=8)
    losses = train_steps(m, [batch], 30)
    for n, p in m.backbone.named_parameters():
        assert torch.equal(p, frozen[n]), f"frozen weight {n} changed"
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, trained_before[n]), f"trainable {n} did not move"
    assert losses[-1] < losses[0] * 0.5


def test_embedding_only_changes_from_the_input_on():
    """Embedding-only prompts sit in front of the first layer's input: every layer's real-token
    outputs change, while the real tokens' own embeddings are computed as without a prompt."""
    m = module(depth="embedding").eval()
    batch = make_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref = m.backbone(**inputs, output_hidden_states=True).hidden_states
        with m.input_prompt.prepended(inputs, m.prompt() * 100) as joined:
            out = m.backbone(**joined, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out[0][:, 4:], ref[0], atol=0, rtol=0)
    torch.testing.assert_close(out[0][:, :4], (m.prompt() * 100)[None].expand(3, -1, -1), atol=0, rtol=0)
    for layer in range(1, len(ref)):
        assert (out[layer][:, 4:] - ref[layer]).abs().max() > 1e-3


def test_embedding_only_output_aligned_with_tokens_at_max_length():
    m = module(depth="embedding", prefix_length=8).eval()
    batch = make_batch(length=max_real_length("bert"))
    with torch.no_grad():
        hidden = m.encode(batch)
    assert hidden.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("depth", ["deep", "embedding"])
@pytest.mark.parametrize("reparam", ["none", "mlp"])
def test_activation_checkpointing_same_loss_and_gradients(depth, reparam):
    batch = make_batch(length=8)

    def loss_and_grads(checkpointing):
        torch.manual_seed(0)
        m = module(depth=depth, reparameterization=reparam, activation_checkpointing=checkpointing)
        m.train()
        loss = torch.nn.functional.cross_entropy(m(batch), batch["labels"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        return loss.detach(), grads, checkpointing_on(m.backbone)

    loss_a, grads_a, on_a = loss_and_grads(False)
    loss_b, grads_b, on_b = loss_and_grads(True)
    assert (on_a, on_b) == (False, True)
    torch.testing.assert_close(loss_a, loss_b)
    assert set(grads_a) == set(grads_b)
    for n in grads_a:
        assert grads_a[n].abs().sum() > 0, f"no gradient reached {n}"
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reparam", ["none", "mlp"])
def test_save_load_fresh_backbone_identical_logits(tmp_path, reparam):
    m = module(reparameterization=reparam, prefix_dropout=0.1)
    train_steps(m, [make_batch(length=8)], 5)
    m.eval()
    batch = make_batch(seed=1)
    with torch.no_grad():
        want = m(batch)
    out = save_pretrained(m, tmp_path / "adapter")
    size = (out / "adapter_model.safetensors").stat().st_size
    n_backbone = sum(p.numel() for p in m.backbone.parameters())
    assert size < 4 * n_backbone / 2, "artifact should hold only trainable tensors"
    # the same seed would rebuild the same random backbone; reseed to prove nothing depends on it
    torch.manual_seed(0)
    fresh = load_pretrained(tmp_path / "adapter")
    assert fresh.prefix.encoder.reparameterization == reparam  # reparameterization network restored
    with torch.no_grad():
        got = fresh(batch)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_load_into_backbone_of_another_shape_names_shapes(tmp_path):
    save_pretrained(module(), tmp_path / "a")
    with pytest.raises((ValueError, RuntimeError), match=r"shape|size"):
        load_pretrained(tmp_path / "a", model_override={"config": {**tiny_model("bert")["config"], "hidden_size": 48,
                                                                    "intermediate_size": 40}})


def test_corrupt_adapter_gives_clear_error(tmp_path):
    d = save_pretrained(module(), tmp_path / "a")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_pretrained(d)


def test_depth_out_of_range_names_layers():
    with pytest.raises(ValueError, match=r"method.depth .*0..2"):
        module(depth=[0, 5])


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n=6):
        self.items = [make_batch(length=8, seed=i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _StopAfterEpoch(L.Callback):
    """Stop after the first epoch, as an interrupted run would (ModelCheckpoint has saved last.ckpt)."""

    def on_train_epoch_end(self, trainer, *args):
        trainer.should_stop = True


def _trainer(root, callbacks=()):
    return L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, limit_val_batches=0,
                     callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True), *callbacks])


def test_resume_continues_from_saved_step(tmp_path):
    loader = DataLoader(_Batches(6), batch_size=None, shuffle=False)
    torch.manual_seed(0)
    straight = module(prefix_dropout=0.0)
    _trainer(tmp_path / "straight").fit(straight, loader)

    torch.manual_seed(0)
    first = module(prefix_dropout=0.0)
    _trainer(tmp_path / "first", [_StopAfterEpoch()]).fit(first, loader)
    ckpt_path = tmp_path / "first" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["global_step"] == 6
    assert ckpt["state_dict"] and all(not k.startswith("backbone.") for k in ckpt["state_dict"]), \
        "checkpoint should hold only trainable tensors"
    torch.manual_seed(1)  # other random trainable inits: everything trainable must come from the checkpoint
    resumed = module(prefix_dropout=0.0)
    resumed.backbone.load_state_dict(straight.backbone.state_dict())  # stands in for the pretrained weights
    trainer = _trainer(tmp_path / "resumed")
    trainer.fit(resumed, loader, ckpt_path=ckpt_path)
    assert trainer.global_step == 12
    for (n, a), (_, b) in zip(straight.trainable_state_dict().items(), resumed.trainable_state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_eval_computes_the_reparameterized_prefix_once_and_notices_updates():
    m = module(reparameterization="mlp").eval()
    calls = []
    m.prefix.encoder.net.register_forward_hook(lambda *a: calls.append(1))
    batch = make_batch()
    with torch.no_grad():
        first = m(batch)
        torch.testing.assert_close(m(batch), first, atol=0, rtol=0)
    assert len(calls) == 1  # cached across batches
    with torch.no_grad():
        m.prefix.encoder.net[0].weight.add_(0.1)  # an update (as an optimizer step makes)
        changed = m(batch)
    assert len(calls) == 2 and not torch.equal(changed, first)
    m.train()
    m(batch)
    assert len(calls) == 3  # training always recomputes (gradients must flow)


@pytest.mark.parametrize("reparam", ["mlp", "lstm"])
def test_eval_cache_follows_dtype_and_in_place_changes(reparam):
    """The cached reparameterized prefix is recomputed after `.to(float64)` (new storage, same
    Parameter objects, same version counters) and after in-place updates: each value equals the
    uncached computation."""
    from peft_lightning.injection.prompt_encoder import PromptEncoder

    enc = PromptEncoder(4, 12, reparam, hidden_size=8, embed_dim=6).eval()

    def uncached():
        return enc.net(enc.embedding.weight)  # the network itself, past the cache

    with torch.no_grad():
        first = enc()
        torch.testing.assert_close(first, uncached(), atol=0, rtol=0)
        enc.to(torch.float64)
        after = enc()
        assert after.dtype == torch.float64
        torch.testing.assert_close(after, uncached(), atol=0, rtol=0)
        enc.embedding.weight.mul_(2.0)  # an optimizer-style in-place update
        doubled = enc()
        torch.testing.assert_close(doubled, uncached(), atol=0, rtol=0)
        assert not torch.allclose(doubled, after)
        enc.load_state_dict({k: v + 0.5 for k, v in enc.state_dict().items()})  # copy_ into the same storage
        torch.testing.assert_close(enc(), uncached(), atol=0, rtol=0)


def test_module_to_float64_evaluates_in_float64_with_the_cached_prefix():
    m = module(reparameterization="mlp").eval()
    batch = make_batch()
    with torch.no_grad():
        m(batch)  # fills the cache in float32
        m.to(torch.float64)
        cached = m(batch)
        m.prefix.encoder.clear_cache()
        fresh = m(batch)
    assert cached.dtype == torch.float64
    torch.testing.assert_close(cached, fresh, atol=0, rtol=0)
