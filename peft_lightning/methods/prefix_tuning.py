"""Prefix-Tuning (Li & Liang, 2021): deep prefixes in every attention module (encoder self-,
decoder self- and cross-attention), produced by an MLP reparameterization (P x hidden table ->
Linear-Tanh-Linear) that eases optimization. Training checkpoints keep the MLP (to resume); the
exported adapter holds the flat prefix it produces, with identical predictions.
Parameter formula: prompting.py (reparameterization mlp)."""
from peft_lightning.methods.prompting import PromptMethod


class PrefixTuning(PromptMethod):
    pass
