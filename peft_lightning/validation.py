"""Config checks that run before any model load or training, naming the key and accepted values."""
from __future__ import annotations

from omegaconf import DictConfig

from peft_lightning.errors import ConfigError
from peft_lightning.injection.modules import ACTIVATIONS
from peft_lightning.injection.prompt_encoder import REPARAMETERIZATIONS
from peft_lightning.methods.adapter import STYLES
from peft_lightning.tasks.heads import HEAD_TYPES, POOLINGS
from peft_lightning.methods.prompting import INITS


def validate_config(cfg: DictConfig) -> None:
    m = cfg.method
    for key in ("prefix_length", "reparam_hidden", "bottleneck", "r"):
        if key in m:
            value = m[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"method.{key} must be a positive integer, got {value!r}")
    for key, allowed in (("init", INITS), ("style", tuple(STYLES)), ("activation", tuple(ACTIVATIONS))):
        if key in m and m[key] not in allowed:
            raise ConfigError(f"method.{key} must be one of {allowed}, got {m[key]!r}")
    head = m.get("head") or {}
    for key, allowed in (("type", HEAD_TYPES), ("pooling", POOLINGS)):
        if key in head and head[key] not in allowed:
            raise ConfigError(f"method.head.{key} must be one of {allowed}, got {head[key]!r}")
    if m.get("init") == "text" and not m.get("init_text"):
        raise ConfigError("method.init=text needs method.init_text (the words to start the prompt from)")
    size = cfg.data.get("train_examples")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0
                             or (isinstance(size, float) and size > 1)):
        raise ConfigError(f"data.train_examples must be a positive count or a fraction in (0, 1], got {size!r}")
    if "reparameterization" in m and m.reparameterization not in REPARAMETERIZATIONS:
        raise ConfigError(f"method.reparameterization must be one of {REPARAMETERIZATIONS}, got {m.reparameterization!r}")
    lr = m.get("optim", {}).get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or lr <= 0):
        raise ConfigError(f"method.optim.lr must be a positive number, got {lr!r}")
    depth = m.get("depth", "deep")
    if not isinstance(depth, str):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in depth):
            raise ConfigError(f"method.depth must be 'deep', 'embedding' or a list of layer indices, got {list(depth)}")
    elif depth not in ("deep", "embedding"):
        raise ConfigError(f"method.depth must be 'deep', 'embedding' or a list of layer indices, got {depth!r}")
    _validate_task(cfg.data)
    _validate_against_backbone(cfg)
    if cfg.data.batch_size <= 0:
        raise ConfigError(f"data.batch_size must be positive, got {cfg.data.batch_size}")


def _validate_against_backbone(cfg: DictConfig) -> None:
    """Checks that need the backbone's config (a small JSON read, no weights)."""
    from omegaconf import OmegaConf

    from peft_lightning.backbone import BackboneSpec, load_config
    from peft_lightning.injection.architectures import ARCHITECTURES

    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("name", None)
    try:
        config = load_config(BackboneSpec(**model))
    except (OSError, ValueError):
        return  # not reachable here (e.g. a hub model offline): loading will say so
    if cfg.data.get("task") == "generation" and ARCHITECTURES.get(config.model_type, None) is not None \
            and ARCHITECTURES[config.model_type].kind == "encoder":
        raise ConfigError(f"data.task=generation needs a decoder or an encoder-decoder; model={cfg.model.name} is an "
                          "encoder. Use e.g. model=smollm2 (embedded), model=gpt2 or an encoder-decoder.")
    if cfg.method.name != "finetune" and config.model_type not in ARCHITECTURES:
        raise ConfigError(
            f"method={cfg.method.name} does not support model={cfg.model.name} "
            f"(architecture '{config.model_type}'); supported architectures: {sorted(ARCHITECTURES)}"
        )
    depth = cfg.method.get("depth", "deep")
    if not isinstance(depth, str):
        bad = [i for i in depth if not 0 <= i < config.num_hidden_layers]
        if bad:
            raise ConfigError(
                f"method.depth has layer index {bad} out of range: model={cfg.model.name} has layers "
                f"0..{config.num_hidden_layers - 1}"
            )


def _validate_task(data: DictConfig) -> None:
    """data.task, its columns, labels and selection metric."""
    from omegaconf import OmegaConf

    from peft_lightning.tasks import TASKS, make_task

    name = data.get("task", "classification")
    if name not in TASKS:
        raise ConfigError(f"data.task must be one of {sorted(TASKS)}, got {name!r}")
    labels = list(data.get("labels") or [])
    task = TASKS[name]
    if name in ("classification", "token_classification") and len(labels) < 2:
        raise ConfigError(f"data.task={name} needs data.labels with at least 2 names, got {labels}")
    columns = OmegaConf.to_container(data.columns, resolve=True) if data.get("columns") else None
    if columns is not None:
        missing = [r for r in task.roles if r not in columns]
        unknown = [r for r in columns if r not in (*task.roles, *task.optional_roles)]
        if missing or unknown:
            raise ConfigError(f"data.columns for data.task={name} needs {list(task.roles)} (optional "
                              f"{list(task.optional_roles)}); missing {missing}, unknown {unknown}")
    options = OmegaConf.to_container(data.generation, resolve=True) if name == "generation" and data.get("generation") else {}
    try:
        make_task(name, labels, "decoder" if name == "generation" else "encoder", data.get("metric"), **options)
    except ValueError as err:
        raise ConfigError(str(err)) from None
