"""Hub model families offline: a folder shaped like the hub repository (config.json as the hub writes it,
random weights in model.safetensors, a tokenizer made here with a tiny vocabulary), loaded through the
ordinary from_pretrained(folder) path, and every method trains a step on it.

Llama-3-style: grouped-query attention, an explicit head_dim (not hidden / heads), "llama3" RoPE scaling
in the hub's legacy `rope_scaling` key, untied embeddings (Llama-3.1-8B), no pad token.
Qwen2-style (Qwen2.5-0.5B): grouped-query attention, q/k/v biases, tied embeddings, a sliding-window
config that is off, yarn RoPE scaling in the older `type` spelling, pad = <|endoftext|>, no bos.
T5 (t5-base): SentencePiece `spiece.model` (trained here) + 100 sentinel tokens, relative position buckets.
DeBERTa-v3 (deberta-v3-base): SentencePiece `spm.model` with [PAD] [CLS] [SEP] [UNK] [MASK], a tokenizer_config
with nothing but `vocab_type: spm` (the class comes from config.json), `pos_att_type: "p2c|c2p"` as a string,
no absolute positions (`position_biased_input: false`), shared attention keys. Both SentencePiece tokenizers
need `sentencepiece` and `protobuf` (declared in pyproject.toml).
BERT (WordPiece vocab.txt), GPT-2, RoBERTa and BART (byte-level BPE vocab.json + merges.txt).
"""
import io
import json

import pytest
import torch
from conftest import train_steps
from test_matrix import method_cfg
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import sentencepiece as spm
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from peft_lightning.backbone import BackboneSpec, attention_geometry, load_tokenizer
from peft_lightning.methods import METHODS

CORPUS = ["the movie was great", "a terrible film", "i loved it", "boring and slow", "what a fine cast"]
TEXTS = ["the movie was great fun", "slow", "a fine film, i loved it"]
P = 4

LLAMA3 = {  # meta-llama/Llama-3.1-8B's config.json, shrunk
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "head_dim": 16, "hidden_act": "silu", "hidden_size": 32,
    "initializer_range": 0.02, "intermediate_size": 37, "max_position_embeddings": 64, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 16, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 320,
}
QWEN2 = {  # Qwen/Qwen2.5-0.5B's config.json, shrunk (plus the yarn scaling its model card adds for long inputs)
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 37,
    "max_position_embeddings": 64, "max_window_layers": 2, "model_type": "qwen2", "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 16, "type": "yarn"},
    "sliding_window": 64, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 320,
}
T5 = {  # google-t5/t5-base's config.json, shrunk
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 37, "d_kv": 8, "d_model": 32, "decoder_start_token_id": 0,
    "dropout_rate": 0.0, "eos_token_id": 1, "initializer_factor": 1.0, "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512, "num_heads": 4, "num_layers": 2,
    "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": 8, "vocab_size": 160,
}
DEBERTA_V3 = {  # microsoft/deberta-v3-base's config.json, shrunk
    "model_type": "deberta-v2", "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 37, "max_position_embeddings": 64,
    "relative_attention": True, "position_buckets": 8, "norm_rel_ebd": "layer_norm", "share_att_key": True,
    "pos_att_type": "p2c|c2p", "layer_norm_eps": 1e-7, "max_relative_positions": -1, "position_biased_input": False,
    "num_attention_heads": 4, "num_hidden_layers": 2, "type_vocab_size": 0, "vocab_size": 64,
}


def sentencepiece_model(path, **ids):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=60,
                                   model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2, **ids)
    path.write_bytes(buf.getvalue())


SPM = {
    "t5": ("spiece.model", dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1),
           {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
            "extra_ids": 100, "model_max_length": 512}),
    "deberta-v3": ("spm.model", dict(pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
                                     eos_piece="[SEP]", unk_piece="[UNK]", user_defined_symbols=["[MASK]"]),
                   {"do_lower_case": False, "vocab_type": "spm"}),
}
FAMILIES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072,
                "clean_up_tokenization_spaces": True}),
    "qwen2": (QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072, "errors": "replace",
               "add_prefix_space": False, "clean_up_tokenization_spaces": False}),
    "t5": (T5, None, None),
    "deberta-v3": (DEBERTA_V3, None, None),
}
# the older families, as their hub repositories ship them: BERT a WordPiece vocab.txt; GPT-2, RoBERTa and
# BART a byte-level BPE vocab.json + merges.txt (no tokenizer.json here: transformers builds it from them)
BERT = {  # google-bert/bert-base-uncased
    "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.0, "gradient_checkpointing": False,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 32, "initializer_range": 0.02,
    "intermediate_size": 37, "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert",
    "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 0, "position_embedding_type": "absolute",
    "transformers_version": "4.6.0.dev0", "type_vocab_size": 2, "use_cache": True, "vocab_size": 200,
}
ROBERTA = {  # FacebookAI/roberta-base
    "architectures": ["RobertaForMaskedLM"], "attention_probs_dropout_prob": 0.0, "bos_token_id": 0, "eos_token_id": 2,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 32, "initializer_range": 0.02,
    "intermediate_size": 37, "layer_norm_eps": 1e-05, "max_position_embeddings": 66, "model_type": "roberta",
    "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 1, "type_vocab_size": 1, "vocab_size": 320,
}
GPT2 = {  # openai-community/gpt2
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.0, "bos_token_id": 299,
    "embd_pdrop": 0.0, "eos_token_id": 299, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2", "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 64,
    "resid_pdrop": 0.0, "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True, "vocab_size": 320,
}
BART = {  # facebook/bart-base
    "activation_dropout": 0.0, "activation_function": "gelu", "add_bias_logits": False, "add_final_layer_norm": False,
    "architectures": ["BartModel"], "attention_dropout": 0.0, "bos_token_id": 0, "d_model": 32,
    "decoder_attention_heads": 4, "decoder_ffn_dim": 37, "decoder_layers": 2, "decoder_start_token_id": 2,
    "dropout": 0.0, "encoder_attention_heads": 4, "encoder_ffn_dim": 37, "encoder_layers": 2, "eos_token_id": 2,
    "forced_bos_token_id": 0, "forced_eos_token_id": 2, "init_std": 0.02, "is_encoder_decoder": True,
    "max_position_embeddings": 64, "model_type": "bart", "normalize_before": False, "normalize_embedding": True,
    "num_hidden_layers": 2, "pad_token_id": 1, "scale_embedding": False, "vocab_size": 320,
}
FILES = {  # family: (config, special tokens in front, special tokens at the end)
    "roberta": (ROBERTA, ["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"]),
    "bart": (BART, ["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"]),
    "gpt2": (GPT2, [], ["<|endoftext|>"]),
}
FAMILIES.update({"bert": (BERT, None, None), **{f: (c, None, None) for f, (c, _, _) in FILES.items()}})
ATTN = {"deberta-v3": "eager"}  # (DeBERTa's attention has no SDPA path)
NO_BIASES = {"llama3", "t5"}


def hub_folder(root, family):
    """config.json, model.safetensors, tokenizer.json (+ vocab.json / merges.txt), tokenizer_config.json."""
    config, special, tok_config = FAMILIES[family]
    folder = root / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model_class = AutoModelForCausalLM if family in ("llama3", "qwen2") else AutoModel
    model_class.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))  # the hub's spelling, not the re-serialised one
    if family == "bert":
        words = sorted({w for line in CORPUS for w in line.split()})
        chars = sorted({c for line in CORPUS for c in line if c != " "})
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars], *words]
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
        return folder
    if family in FILES:
        _, front, end = FILES[family]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
            vocab_size=300 - len(end), special_tokens=front, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        tok.model.save(str(folder))
        vocab = json.loads((folder / "vocab.json").read_text())
        vocab.update({t: len(vocab) + i for i, t in enumerate(end)})  # <mask> / <|endoftext|> come last
        (folder / "vocab.json").write_text(json.dumps(vocab))
        return folder
    if family in SPM:
        name, ids, tok_config = SPM[family]
        sentencepiece_model(folder / name, **ids)
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
        return folder
    tok = Tokenizer(models.BPE())  # byte-level BPE, as both families ship
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if family == "llama3":  # Llama 3 prepends <|begin_of_text|>
        tok.post_processor = processors.TemplateProcessing(
            single=f"{special[0]} $A", pair=f"{special[0]} $A {special[0]} $B:1",
            special_tokens=[(special[0], tok.token_to_id(special[0]))])
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))  # vocab.json, merges.txt
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {family: hub_folder(root, family) for family in FAMILIES}


def batch_for(folder):
    tokenizer = load_tokenizer(BackboneSpec(name_or_path=str(folder)))
    if tokenizer.pad_token is None:  # as the data module does (Llama 3 has none)
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([1, 0, 1])}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hub_shaped_folder_loads_as_the_hub_model(family, folders):
    folder = folders[family]
    tokenizer = load_tokenizer(BackboneSpec(name_or_path=str(folder)))
    ids = tokenizer("the movie")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the movie"
    assert max(ids) < FAMILIES[family][0]["vocab_size"]
    if family in ("bert", "roberta", "bart"):  # [CLS] ... [SEP] / <s> ... </s>
        assert (ids[0], ids[-1]) == ((2, 3) if family == "bert" else (0, 2))
        return
    if family == "gpt2":
        assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == GPT2["eos_token_id"]
        return
    if family == "t5":
        assert ids[-1] == 1 and tokenizer.convert_tokens_to_ids("<extra_id_0>") > 2  # </s>; sentinels
        return
    if family == "deberta-v3":
        assert (ids[0], ids[-1], tokenizer.pad_token_id) == (1, 2, 0) and tokenizer.mask_token == "[MASK]"
        config = AutoConfig.from_pretrained(folder)
        assert config.pos_att_type == ["p2c", "c2p"] and not config.position_biased_input
        return
    if family == "llama3":
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>") and tokenizer.pad_token is None
    else:
        assert tokenizer.bos_token is None and tokenizer.pad_token == "<|endoftext|>"
    config = AutoConfig.from_pretrained(folder)
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == ("llama3" if family == "llama3" else "yarn") and rope["factor"] > 1
    model = AutoModelForCausalLM.from_pretrained(folder)
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == FAMILIES[family][0]["tie_word_embeddings"]
    if family == "qwen2":
        assert model.model.layers[0].self_attn.k_proj.bias is not None


CASES = [(f, m) for f in FAMILIES for m in METHODS if not (f in NO_BIASES and m == "bitfit")]


@pytest.mark.parametrize("family,name", CASES)
def test_every_method_trains_a_step_on_the_hub_family(family, name, folders):
    folder = folders[family]
    m = METHODS[name](model={"name_or_path": str(folder), "attn_implementation": ATTN.get(family, "sdpa")},
                      method=method_cfg(name), num_labels=2)
    if getattr(m, "prefix", None) is not None:  # prefixes sized from num_key_value_heads and head_dim
        _, kv_heads, head_dim = attention_geometry(m.backbone.config)
        assert (kv_heads, head_dim) == {"llama3": (2, 16), "qwen2": (2, 8)}.get(family, (4, 8))
        state = m.prefix(1)
        assert {tuple(k.shape) for k in state.keys.values()} == {(1, kv_heads, P, head_dim)}
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    losses = train_steps(m, [batch_for(folder)], 1)
    assert torch.isfinite(torch.tensor(losses)).all()
    moved = [n for n, p in m.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert set(moved) == set(before), f"did not train: {sorted(set(before) - set(moved))}"
