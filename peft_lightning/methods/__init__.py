"""Methods, one LightningModule each, by config name (`method.name`)."""
from peft_lightning.methods.base import PeftClassifier
from peft_lightning.methods.bitfit import BitFit
from peft_lightning.methods.finetune import FineTune
from peft_lightning.methods.ptuning_v2 import PTuningV2

METHODS: dict[str, type[PeftClassifier]] = {
    "bitfit": BitFit,
    "finetune": FineTune,
    "ptuning_v2": PTuningV2,
}


def method_class(name: str) -> type[PeftClassifier]:
    if name not in METHODS:
        raise ValueError(f"Unknown method '{name}'. Available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


__all__ = ["METHODS", "BitFit", "FineTune", "PeftClassifier", "PTuningV2", "method_class"]
