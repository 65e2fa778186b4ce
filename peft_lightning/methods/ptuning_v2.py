"""P-Tuning v2 (Liu et al., 2022): deep prompts at every layer, no reparameterization, and a
randomly initialised linear head on the first token. Knobs and parameter formula: prompting.py.
With S attention slots of width `hidden` and C classes: P x 2 x S x hidden + hidden x C + C."""
from peft_lightning.methods.prompting import PromptMethod, parse_depth


class PTuningV2(PromptMethod):
    pass


__all__ = ["PTuningV2", "parse_depth"]
