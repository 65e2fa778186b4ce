"""Methods that train backbone weights in place: full fine-tuning and BitFit."""
import pytest
import torch
from conftest import make_batch, tiny_model, train_steps

from peft_lightning.checkpoint import load_pretrained, save_pretrained
from peft_lightning.methods import BitFit, FineTune


def build(cls, arch="bert"):
    return cls(model=tiny_model(arch), method={"name": cls.__name__.lower(), "head": {"dropout": 0.0}}, num_labels=2)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bitfit_trains_biases_alone(arch):
    m = build(BitFit, arch)
    bias_count = sum(p.numel() for n, p in m.backbone.named_parameters()
                     if n.endswith(".bias") and not n.startswith("pooler."))
    assert m.parameter_counts()["trainable"] == bias_count + 32 * 2 + 2  # biases + head
    before = {n: p.detach().clone() for n, p in m.backbone.named_parameters()}
    losses = train_steps(m, [make_batch(length=8)], 20)
    assert losses[-1] < losses[0]
    for n, p in m.backbone.named_parameters():
        if n.endswith(".bias") and not n.startswith("pooler."):
            assert not torch.equal(p, before[n]), f"bias {n} did not train"
        else:
            assert torch.equal(p, before[n]), f"non-bias {n} changed"


def test_finetune_trains_everything_and_round_trips(tmp_path):
    m = build(FineTune)
    counts = m.parameter_counts()
    pooler = sum(p.numel() for p in m.backbone.pooler.parameters())
    assert counts["trainable"] == counts["total"] - pooler  # the unused pooler stays frozen
    train_steps(m, [make_batch(length=8)], 5)
    m.eval()
    batch = make_batch(seed=3)
    with torch.no_grad():
        want = m(batch)
    save_pretrained(m, tmp_path / "a")
    torch.manual_seed(123)  # a different random backbone: the weights must come from the file
    with torch.no_grad():
        got = load_pretrained(tmp_path / "a")(batch)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
