"""P-Tuning (Liu et al., 2021, "GPT Understands, Too"): input-level virtual tokens produced by a
prompt encoder, a biLSTM + MLP (`reparameterization: lstm`) or an MLP (`mlp`). The encoder can be
ejected into a flat table after training (identical outputs). Formula: prompting.py."""
from peft_lightning.methods.prompting import PromptMethod


class PTuning(PromptMethod):
    pass
