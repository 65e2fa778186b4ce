import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY = {
    "bert": dict(model_type="bert", vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=24, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0),
    "roberta": dict(model_type="roberta", vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=37, max_position_embeddings=26, pad_token_id=1, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0),
    "deberta-v2": dict(model_type="deberta-v2", vocab_size=99, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=37, max_position_embeddings=24,
                       relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                       max_relative_positions=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "gpt2": dict(model_type="gpt2", vocab_size=99, n_embd=32, n_layer=3, n_head=4, n_positions=24,
                 bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(model_type="llama", vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=37, max_position_embeddings=24, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0),
    "t5": dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0),
    "bart": dict(model_type="bart", vocab_size=99, d_model=32, encoder_layers=3, decoder_layers=3,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                 max_position_embeddings=24, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
}
ARCHS = list(TINY)


def tiny_model(arch: str, attn: str | None = None) -> dict:
    return {"config": dict(TINY[arch]), "attn_implementation": attn}


def max_real_length(arch: str) -> int:
    cfg = TINY[arch]
    # RoBERTa's positions start after pad_token_id + 1
    return cfg["max_position_embeddings"] - (cfg["pad_token_id"] + 1 if arch == "roberta" else 0)


def make_batch(arch: str = "bert", batch: int = 3, length: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY[arch]["vocab_size"], (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0  # one padded example
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


WORD_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]


def save_word_tokenizer(folder, words: list[str]) -> str:
    """A word-level BERT-style tokenizer ([CLS] a [SEP] b [SEP]) over `words`, saved in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(WORD_SPECIAL + list(words))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", eos_token="</s>").save_pretrained(folder)
    return str(folder)


def train_steps(m, batches, steps):
    """Plain AdamW steps on the trainable parameters (weight decay on, so frozen ones would move if
    the optimizer saw them); returns the losses."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    m.train()
    losses = []
    for i in range(steps):
        batch = batches[i % len(batches)]
        loss = torch.nn.functional.cross_entropy(m(batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
