"""Mechanisms that put learned vectors into a frozen backbone; methods compose them."""
from peft_lightning.injection.input_prompt import InputPrompt
from peft_lightning.injection.prefix import PrefixState, install_prefix_attention
from peft_lightning.injection.prefix_encoder import PrefixEncoder
from peft_lightning.injection.prompt_encoder import PromptEncoder

__all__ = ["InputPrompt", "PrefixEncoder", "PrefixState", "PromptEncoder", "install_prefix_attention"]
