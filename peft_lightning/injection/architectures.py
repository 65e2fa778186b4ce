"""What each supported backbone architecture looks like to the injection code, in one table.

Every method finds the modules it touches through this table (keyed by `config.model_type`), so
supporting a new architecture means adding one entry here, and an unsupported one fails with an
error that lists what is supported.

Module patterns are regular expressions matched (with `re.search`) against the names from
`model.named_modules()` of the bare backbone (`AutoModel`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Architecture:
    kind: str  # encoder | decoder | encoder-decoder
    attention: tuple[str, ...]  # attention module class names (self- and cross-attention)
    # input-level prompts: the module whose output the prompt is prepended to (called once per
    # forward); None: we embed the tokens ourselves and pass `inputs_embeds` with explicit position
    # ids (decoders, whose models derive positions and output shapes from the input length)
    prompt_module: str | None
    # adapters: sublayer output projections (before the residual add), by sublayer
    adapter_targets: dict[str, str] = field(default_factory=dict)
    lora_targets: tuple[str, ...] = ()  # default LoRA targets (query and value projections)
    # (IA)^3: the key and value projections of every attention module (self and cross)
    key_value: tuple[str, ...] = ()
    fused_qkv: bool = False  # GPT-2: one projection (c_attn) outputs q, k, v concatenated, in that order
    # a module whose output (position embeddings) must skip the prompt positions
    positions_module: str | None = None
    # the embedding module gets the attention mask as a keyword and must see only the real tokens
    embedding_mask_kwarg: str | None = None


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(
        "encoder", ("BertSelfAttention",), "embeddings",
        {"attention": r"attention\.output\.dense$", "ffn": r"layer\.\d+\.output\.dense$"},
        (r"attention\.self\.query$", r"attention\.self\.value$"),
        key_value=(r"attention\.self\.key$", r"attention\.self\.value$"),
    ),
    "roberta": Architecture(
        "encoder", ("RobertaSelfAttention",), "embeddings",
        {"attention": r"attention\.output\.dense$", "ffn": r"layer\.\d+\.output\.dense$"},
        (r"attention\.self\.query$", r"attention\.self\.value$"),
        key_value=(r"attention\.self\.key$", r"attention\.self\.value$"),
    ),
    "deberta-v2": Architecture(
        "encoder", ("DisentangledSelfAttention",), "embeddings",
        {"attention": r"attention\.output\.dense$", "ffn": r"layer\.\d+\.output\.dense$"},
        (r"self\.query_proj$", r"self\.value_proj$"),
        embedding_mask_kwarg="mask",
        key_value=(r"self\.key_proj$", r"self\.value_proj$"),
    ),
    "gpt2": Architecture(
        "decoder", ("GPT2Attention",), None,
        {"attention": r"attn\.c_proj$", "ffn": r"mlp\.c_proj$"},
        (r"attn\.c_attn$",),  # GPT-2 projects q, k, v with one fused layer
        key_value=(r"attn\.c_attn$",), fused_qkv=True,
    ),
    "llama": Architecture(
        "decoder", ("LlamaAttention",), None,
        {"attention": r"self_attn\.o_proj$", "ffn": r"mlp\.down_proj$"},
        (r"q_proj$", r"v_proj$"),
        key_value=(r"k_proj$", r"v_proj$"),
    ),
    "qwen2": Architecture(  # Llama's layout, with q/k/v biases (and an optional sliding window, off by default)
        "decoder", ("Qwen2Attention",), None,
        {"attention": r"self_attn\.o_proj$", "ffn": r"mlp\.down_proj$"},
        (r"q_proj$", r"v_proj$"),
        key_value=(r"k_proj$", r"v_proj$"),
    ),
    "t5": Architecture(
        "encoder-decoder", ("T5Attention",), "encoder.embed_tokens",
        {"attention": r"(SelfAttention|EncDecAttention)\.o$", "ffn": r"DenseReluDense\.wo$"},
        (r"Attention\.q$", r"Attention\.v$"),
        key_value=(r"Attention\.k$", r"Attention\.v$"),
    ),
    "bart": Architecture(
        "encoder-decoder", ("BartAttention",), "encoder.embed_tokens",
        {"attention": r"(self_attn|encoder_attn)\.out_proj$", "ffn": r"layers\.\d+\.fc2$"},
        (r"q_proj$", r"v_proj$"),
        positions_module="encoder.embed_positions",
        key_value=(r"k_proj$", r"v_proj$"),
    ),
}


def supported() -> list[str]:
    return sorted(ARCHITECTURES)


def architecture(model_type: str, what: str = "This method") -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{what} does not support architecture '{model_type}'. Supported: {', '.join(supported())}."
        )
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class AttentionSlot:
    """One attention module that can take a prefix: its layer index and role."""

    name: str
    layer: int
    role: str  # encoder | decoder | cross


def attention_slots(model: nn.Module) -> list[tuple[AttentionSlot, nn.Module]]:
    """The attention modules of `model`, in module order, each with its layer and role."""
    arch = architecture(model.config.model_type, "Prefix injection")
    slots = []
    for name, module in model.named_modules():
        if type(module).__name__ not in arch.attention:
            continue
        numbers = re.findall(r"\.(\d+)\.", f".{name}.")
        layer = int(numbers[0]) if numbers else 0
        if re.search(r"(encoder_attn|EncDecAttention|crossattention)", name):
            role = "cross"
        elif arch.kind == "encoder-decoder" and name.startswith("decoder."):
            role = "decoder"
        else:
            role = "encoder" if arch.kind != "decoder" else "decoder"
        slots.append((AttentionSlot(name, layer, role), module))
    return slots


def matching_modules(model: nn.Module, patterns) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose name matches one of `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return [(n, m) for n, m in model.named_modules() if n and any(c.search(n) for c in compiled)]


def num_layers(model_config) -> int:
    """Layers per stack (encoder-decoders: the encoder's; decoder slots reuse the same indices)."""
    return int(model_config.num_hidden_layers)
