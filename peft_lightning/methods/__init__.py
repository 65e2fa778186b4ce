"""Methods, one LightningModule each, by config name (`method.name`)."""
from peft_lightning.methods.adapter import AdapterTuning
from peft_lightning.methods.base import PeftClassifier
from peft_lightning.methods.bitfit import BitFit
from peft_lightning.methods.finetune import FineTune
from peft_lightning.methods.ia3 import IA3
from peft_lightning.methods.lora import DoRATuning, LoRATuning
from peft_lightning.methods.p_tuning import PTuning
from peft_lightning.methods.prefix_tuning import PrefixTuning
from peft_lightning.methods.prompt_tuning import PromptTuning
from peft_lightning.methods.ptuning_v2 import PTuningV2
from peft_lightning.methods.unipelt import UniPELT

METHODS: dict[str, type[PeftClassifier]] = {
    "adapter": AdapterTuning,
    "bitfit": BitFit,
    "dora": DoRATuning,
    "finetune": FineTune,
    "ia3": IA3,
    "lora": LoRATuning,
    "p_tuning": PTuning,
    "prefix_tuning": PrefixTuning,
    "prompt_tuning": PromptTuning,
    "ptuning_v2": PTuningV2,
    "unipelt": UniPELT,
}


def method_class(name: str) -> type[PeftClassifier]:
    if name not in METHODS:
        raise ValueError(f"Unknown method '{name}'. Available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


__all__ = ["METHODS", "AdapterTuning", "BitFit", "DoRATuning", "FineTune", "IA3", "LoRATuning", "PTuning", "PTuningV2",
           "PeftClassifier", "PrefixTuning", "PromptTuning", "UniPELT", "method_class"]
