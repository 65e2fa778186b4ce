"""Prompt Tuning (Lester et al., 2021): P soft-prompt vectors in front of the input embeddings,
nothing else (plus the head). Init: random-uniform [-0.5, 0.5], sampled vocabulary, class-label
words or a given text (`init`, `init_text`). Trainable: P x hidden + head (prompting.py)."""
from peft_lightning.methods.prompting import PromptMethod


class PromptTuning(PromptMethod):
    pass
