"""The classification-head knob: linear head pooling and the verbalizer through the LM head."""
import pytest
import torch
from conftest import make_batch, tiny_model, train_steps
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from peft_lightning.backbone import BackboneSpec, load_config, load_tokenizer
from peft_lightning.methods import METHODS

VOCAB = 30522  # the embedded MiniLM tokenizer's, so label words map into the tiny model


def lm_model(arch):
    spec = tiny_model(arch)
    spec["config"]["vocab_size"] = VOCAB
    spec["tokenizer"] = "embedded:minilm"
    return spec


def verbalized(arch, name="prompt_tuning", **head):
    method = dict(name=name, prefix_length=4, depth="embedding", reparameterization="none",
                  head={"type": "verbalizer", **head})
    return METHODS[name](model=lm_model(arch), method=method, num_labels=2, labels=["negative", "positive"])


def test_mask_token_goes_before_the_final_separator():
    m = verbalized("bert")
    tok = load_tokenizer(BackboneSpec(tokenizer="embedded:minilm"))
    enc = tok(["a good film", "bad"], padding=True, return_tensors="pt")
    out = m.head.with_mask_token(dict(enc))
    assert tok.convert_ids_to_tokens(out["input_ids"][0]) == ["[CLS]", "a", "good", "film", "[MASK]", "[SEP]"]
    assert tok.convert_ids_to_tokens(out["input_ids"][1][:4]) == ["[CLS]", "bad", "[MASK]", "[SEP]"]
    assert out["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]


@pytest.mark.parametrize("arch,lm_class", [("bert", AutoModelForMaskedLM), ("llama", AutoModelForCausalLM)])
def test_verbalizer_reads_the_lm_heads_label_word_scores(arch, lm_class):
    """Without a prompt in the way (finetune: no injection), the verbalizer's logits are exactly
    the stock LM-head model's logits for the label words at the read position."""
    torch.manual_seed(0)
    m = verbalized(arch, name="finetune").eval()
    assert m.backbone.get_input_embeddings().weight.requires_grad  # tied to the LM head, still fine-tuned
    torch.manual_seed(0)
    reference = lm_class.from_config(load_config(BackboneSpec(**lm_model(arch)))).eval()
    reference.load_state_dict({**reference.state_dict(), **{f"{reference.base_model_prefix}.{k}": v
                                                           for k, v in m.backbone.state_dict().items()}})
    batch = make_batch("bert", length=8)
    with torch.no_grad():
        ours = m(batch)
        inputs = m.head.with_mask_token(batch)
        logits = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    last = inputs["attention_mask"].sum(1) - 1
    read = last - 1 if arch == "bert" else last
    want = logits[torch.arange(3), read][:, m.head.label_word_ids]
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_verbalized_prompt_tuning_trains_the_prompt_alone(arch):
    m = verbalized(arch)
    assert m.parameter_counts()["trainable"] == 4 * 32  # the prompt; the LM head stays frozen
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    losses = train_steps(m, [make_batch("bert", length=8)], 15)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", ["prompt_tuning", "ia3"])
def test_verbalized_adapter_reloads_and_resumes(tmp_path, name):
    """The verbalizer's label-word ids are a non-persistent buffer (rebuilt from the config): not a
    trainable tensor that an adapter or a checkpoint must hold. (They were counted as one, so every
    verbalizer adapter failed to load and every verbalizer run failed to resume.)"""
    from peft_lightning.checkpoint import load_pretrained, save_pretrained

    torch.manual_seed(0)
    m = verbalized("bert", name=name)
    train_steps(m, [make_batch("bert", length=8)], 3)
    m.on_load_checkpoint({"state_dict": m.trainable_state_dict()})  # a resume of its own checkpoint
    batch = make_batch("bert", seed=2)
    with torch.no_grad():
        want = m.eval()(batch)
        folder = save_pretrained(m, tmp_path / "a")
        torch.manual_seed(123)  # another random draw: a config-built backbone's weights, LM head too, are in the folder
        torch.testing.assert_close(load_pretrained(folder)(batch), want, atol=0, rtol=0)


def test_verbalizer_errors_name_the_fix():
    with pytest.raises(ValueError, match="one word per class"):
        verbalized("bert", label_words=["good"])
    with pytest.raises(ValueError, match="Use head.type=linear"):
        METHODS["lora"](model=lm_model("t5"), method={"name": "lora", "head": {"type": "verbalizer"}},
                        num_labels=2, labels=["negative", "positive"])


@pytest.mark.parametrize("pooling,index", [("first", 0), ("last", "last"), ("mean", None)])
def test_linear_head_pooling(pooling, index):
    m = METHODS["lora"](model=tiny_model("bert"), method={"name": "lora", "head": {"pooling": pooling, "dropout": 0}},
                        num_labels=2).eval()
    hidden = torch.randn(3, 10, 32)
    mask = make_batch()["attention_mask"]
    if index == 0:
        pooled = hidden[:, 0]
    elif index == "last":
        pooled = hidden[torch.arange(3), mask.sum(1) - 1]
    else:
        pooled = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    torch.testing.assert_close(m.head(hidden, mask), m.head.linear(pooled))
