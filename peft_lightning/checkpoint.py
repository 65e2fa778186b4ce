"""The PEFT artifact: trainable tensors as safetensors + the config to rebuild the module.

    adapter/adapter_model.safetensors   only the method's trainable tensors and the head
    adapter/adapter_config.json         model, method, labels: enough to rebuild on a fresh backbone
    adapter/backbone_model.safetensors  a config-built (random) backbone's weights (+ lm_head_model.safetensors:
                                        a verbalizer's LM head), which no file elsewhere holds

Lightning's own .ckpt files (for resuming: optimizer, scheduler and loop state) also hold only the
trainable tensors; see PeftClassifier.on_save_checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from peft_lightning.backbone import check_tokenizer_fits
from peft_lightning.errors import AdapterError
from peft_lightning.schema import own_method_keys

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# A backbone built from a config (random weights: tests, smoke runs) has no file to be reloaded
# from, so its weights travel with the adapter.
BACKBONE = "backbone_model.safetensors"
LM_HEAD = "lm_head_model.safetensors"  # the verbalizer head's frozen LM head (outside the bare backbone)


def _random_parts(module) -> dict[str, object]:
    """File name -> the frozen module whose random weights a config-built backbone's adapter carries."""
    parts = {BACKBONE: module.backbone}
    lm_head = getattr(module.head, "lm_head", None)  # (a verbalizer: its transform and bias are drawn too)
    if lm_head is not None:
        parts[LM_HEAD] = lm_head
    return parts


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
    config["method"] = own_method_keys(method)  # (read back strictly by read_config)
    _atomic_save(tensors, directory / WEIGHTS)
    if module.hparams.model.get("config") is not None:
        for name, part in _random_parts(module).items():
            tmp = directory / (name + ".tmp")
            save_model(part, str(tmp))  # (handles tied weights)
            os.replace(tmp, directory / name)
    tmp = directory / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, directory / CONFIG)
    return directory


# what save_pretrained writes: adapter_config.json keys, and the model keys (BackboneSpec's)
CONFIG_KEYS = ("model", "method", "num_labels", "labels", "task")
REQUIRED_KEYS = ("model", "method", "num_labels")
MODEL_KEYS = ("name_or_path", "config", "attn_implementation", "tokenizer")


def read_config(config_file: Path) -> dict:
    """adapter_config.json, checked key by key: every problem is an AdapterError naming file and key."""
    from peft_lightning.methods import METHODS
    from peft_lightning.tasks import TASKS

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_file} is not valid JSON ({err}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise AdapterError(f"{config_file}: unknown key(s) {unknown}; an adapter config has {list(CONFIG_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise AdapterError(f"{config_file}: missing key(s) {missing}; an adapter config has {list(CONFIG_KEYS)}")
    model, method = config["model"], config["method"]
    if not isinstance(model, dict) or not (model.get("name_or_path") or model.get("config")):
        raise AdapterError(f"{config_file}: key 'model' must be an object with 'name_or_path' or 'config', "
                           f"got {model!r}")
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:
        raise AdapterError(f"{config_file}: unknown key(s) {['model.' + k for k in unknown]}; "
                           f"model has {list(MODEL_KEYS)}")
    if not isinstance(method, dict) or "name" not in method:
        raise AdapterError(f"{config_file}: key 'method.name' is missing (one of {sorted(METHODS)})")
    if method["name"] not in METHODS:
        raise AdapterError(f"{config_file}: method.name={method['name']!r} is not a method; known: {sorted(METHODS)}")
    from peft_lightning.errors import ConfigError
    from peft_lightning.schema import check_method

    try:  # the method's keys against the same declaration a training config is checked with
        check_method(method)
    except ConfigError as err:
        raise AdapterError(f"{config_file}: {err}") from None
    num_labels, labels = config["num_labels"], config.get("labels")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 0:
        raise AdapterError(f"{config_file}: key 'num_labels' must be a count, got {num_labels!r}")
    if labels is not None and (not isinstance(labels, list) or (labels and len(labels) != num_labels)):
        raise AdapterError(f"{config_file}: key 'labels' must be a list of num_labels={num_labels} names, "
                           f"got {labels!r}")
    task = config.get("task")
    if task is not None and (not isinstance(task, dict) or task.get("name", "classification") not in TASKS):
        raise AdapterError(f"{config_file}: key 'task.name' must be one of {sorted(TASKS)}, got {task!r}")
    return config


def _shape_settings(config: dict) -> str:
    """The config's values that decide tensor shapes, named as keys: model, method sizes, task."""
    model = config["model"]
    parts = [f"model.config.{k}={model['config'][k]}" for k in ("model_type", "hidden_size", "num_hidden_layers")
             if isinstance(model.get("config"), dict) and k in model["config"]]
    if model.get("name_or_path"):
        parts.insert(0, f"model.name_or_path={model['name_or_path']}")
    parts += [f"method.{k}={v}" for k, v in config["method"].items() if k != "name" and not isinstance(v, (dict, list))]
    task = config.get("task") or {"name": "classification"}  # (the module's default)
    parts += [f"task={task.get('name') if isinstance(task, dict) else task}", f"num_labels={config['num_labels']}"]
    return ", ".join(parts)


def _one_line(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_tensors(file: Path) -> dict:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{file} is truncated or corrupt ({err}); save the adapter again") from None


def _check_tokenizer(module, config: dict, config_file: Path) -> None:
    """Load the adapter's tokenizer now (not at the first prediction) so that a name that is not a
    tokenizer, or another model's tokenizer, is an AdapterError here, not a traceback or different
    numbers later. A config-built backbone without model.tokenizer has no tokenizer: tensors only."""
    model = config["model"]
    key = "model.tokenizer" if model.get("tokenizer") else "model.name_or_path"
    if not (model.get("tokenizer") or model.get("name_or_path")):
        return
    try:
        check_tokenizer_fits(module.tokenizer, module.backbone, f"{key}={model.get(key.split('.')[1])!r}")
    except (ValueError, OSError) as err:  # unknown embedded name / not a tokenizer here / too big
        raise AdapterError(f"{config_file}: key '{key}': {_one_line(err)}") from err


def load_pretrained(directory: str | Path, model_override: dict | None = None):
    """Rebuild the module on a fresh frozen backbone and load the trainable tensors. Anything
    missing, damaged or inconsistent in the directory is an AdapterError naming the file (and
    key): an adapter never loads half-way and answers at random."""
    from peft_lightning.methods import method_class

    directory = Path(directory)
    config_file, weights_file, backbone_file = directory / CONFIG, directory / WEIGHTS, directory / BACKBONE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise AdapterError(f"{f} not found: not a peft-lightning adapter directory")
    config = read_config(config_file)
    if model_override:
        config["model"] = {**config["model"], **model_override}
    if config["model"].get("config") is not None and not backbone_file.is_file():
        # a backbone built from a config has random weights: without its file the adapter would
        # sit on another random backbone, and answer at random
        raise AdapterError(f"{backbone_file} not found: model.config in {config_file} builds a randomly initialised "
                           "backbone, whose weights must be saved with the adapter")
    try:
        module = method_class(config["method"]["name"])(**config)
    except (ValueError, KeyError, TypeError) as err:  # a value of the config the method refuses
        if isinstance(err, AdapterError):
            raise
        raise AdapterError(f"{config_file}: {type(err).__name__}: {_one_line(err)}") from err
    except OSError as err:  # model.name_or_path is not a model here
        raise AdapterError(f"{config_file}: key 'model' {config['model']} cannot be loaded ({_one_line(err)})") from err
    _check_tokenizer(module, config, config_file)
    tensors = _load_tensors(weights_file)
    expected = module.trainable_state_keys()
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise AdapterError(f"{weights_file}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}: the "
                           f"tensors do not fit method {config['method']} of {config_file}")
    own = module.state_dict()
    for k, v in tensors.items():
        if own[k].shape != v.shape:  # the shape follows the model, the method's sizes and the task alike
            raise AdapterError(
                f"{weights_file}: tensor '{k}' has shape {tuple(v.shape)} but the settings of {config_file} "
                f"({_shape_settings(config)}) build {tuple(own[k].shape)}; the adapter config's model, method or "
                "task settings differ from the ones the tensors were trained with"
            )
    module.load_state_dict(tensors, strict=False)
    if backbone_file.is_file():
        for name, part in _random_parts(module).items():
            file = directory / name
            if not file.is_file():  # (the backbone's is checked above, before anything was built)
                raise AdapterError(f"{file} not found: model.config in {config_file} builds a randomly initialised "
                                   "backbone and LM head, whose weights must be saved with the adapter")
            try:
                load_model(part, str(file))  # (ties shared weights again)
            except (SafetensorError, OSError) as err:
                raise AdapterError(f"{file} is truncated or corrupt ({err}); save the adapter again") from None
            except RuntimeError as err:
                raise AdapterError(f"{file} does not fit key 'model' of {config_file}: {_one_line(err)}") from None
    return module.eval()
