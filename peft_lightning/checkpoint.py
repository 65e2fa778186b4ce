"""The PEFT artifact: trainable tensors as safetensors + the config to rebuild the module.

    adapter/adapter_model.safetensors   only the method's trainable tensors and the head
    adapter/adapter_config.json         model, method, labels: enough to rebuild on a fresh backbone

Lightning's own .ckpt files (for resuming: optimizer, scheduler and loop state) also hold only the
trainable tensors; see PeftClassifier.on_save_checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# A backbone built from a config (random weights: tests, smoke runs) has no file to be reloaded
# from, so its weights travel with the adapter.
BACKBONE = "backbone_model.safetensors"


def _atomic_save(tensors: dict, path: Path) -> None:
    # write-then-rename: a kill mid-write never leaves a half-written file under the final name
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def save_pretrained(module, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, method = module.export_state()
    config = {k: module.hparams.get(k) for k in ("model", "num_labels", "labels", "task")}
    config["method"] = method
    _atomic_save(tensors, directory / WEIGHTS)
    if module.hparams.model.get("config") is not None:
        tmp = directory / (BACKBONE + ".tmp")
        save_model(module.backbone, str(tmp))  # (handles tied weights)
        os.replace(tmp, directory / BACKBONE)
    tmp = directory / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, directory / CONFIG)
    return directory


def load_pretrained(directory: str | Path, model_override: dict | None = None):
    """Rebuild the module on a fresh frozen backbone and load the trainable tensors."""
    from peft_lightning.methods import method_class

    directory = Path(directory)
    config_file, weights_file = directory / CONFIG, directory / WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: not a peft-lightning adapter directory")
    config = json.loads(config_file.read_text())
    if model_override:
        config["model"] = {**config["model"], **model_override}
    module = method_class(config["method"]["name"])(**config)
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_file} is truncated or corrupt ({err}); re-export it from a .ckpt") from err
    expected = module.trainable_state_keys()
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise KeyError(f"{weights_file}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    own = module.state_dict()
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise ValueError(
                f"{weights_file}: tensor '{k}' has shape {tuple(v.shape)} but this backbone needs "
                f"{tuple(own[k].shape)}; the adapter was trained on a backbone of another shape"
            )
    module.load_state_dict(tensors, strict=False)
    if (directory / BACKBONE).is_file():
        load_model(module.backbone, str(directory / BACKBONE))
    return module.eval()
