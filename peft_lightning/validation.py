"""Config checks that run before any model load or training, naming the key and accepted values.

First every key against the schema (peft_lightning/schema.py: an unknown key is an error, not
ignored), then the values, then what needs the backbone's config (a small JSON read, no weights).
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from peft_lightning.errors import ConfigError
from peft_lightning.injection.modules import ACTIVATIONS
from peft_lightning.injection.prompt_encoder import REPARAMETERIZATIONS
from peft_lightning.methods.adapter import STYLES
from peft_lightning.tasks.heads import HEAD_TYPES, POOLINGS
from peft_lightning.methods.prompting import INITS
from peft_lightning.schema import check_keys

log = logging.getLogger(__name__)
# a prompt with more parameters than this share of the whole model gets a warning
PROMPT_SHARE_WARNING = 0.5


def validate_config(cfg: DictConfig) -> None:
    check_keys(OmegaConf.to_container(cfg, resolve=False))
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
    if m.get("init") == "adapter" and not m.get("init_from"):
        raise ConfigError("method.init=adapter needs method.init_from: a trained adapter folder (<run>/adapter)")
    # a source set for another init is never read (a sweep may set it for every arm: a warning, not an error)
    for key, init in (("init_from", "adapter"), ("init_text", "text")):
        if m.get(key) and m.get("init") != init:
            log.warning("method.%s is read only with method.init=%s; this run starts from init=%s", key, init,
                        m.get("init"))
    if "reparameterization" in m and m.reparameterization not in REPARAMETERIZATIONS:
        raise ConfigError(f"method.reparameterization must be one of {REPARAMETERIZATIONS}, got {m.reparameterization!r}")
    for key in ("lr", "lr_ratio"):
        value = m.get("optim", {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"method.optim.{key} must be a positive number, got {value!r}")
    ratio, steps = m.get("optim", {}).get("warmup_ratio"), m.get("optim", {}).get("warmup_steps")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
        raise ConfigError(f"method.optim.warmup_ratio must be a number in [0, 1), got {ratio!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ConfigError(f"method.optim.warmup_steps must be a count >= 0 (or null: use warmup_ratio), got {steps!r}")
    depth = m.get("depth", "deep")
    if not isinstance(depth, str):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in depth):
            raise ConfigError(f"method.depth must be 'deep', 'embedding' or a list of layer indices, got {list(depth)}")
    elif depth not in ("deep", "embedding"):
        raise ConfigError(f"method.depth must be 'deep', 'embedding' or a list of layer indices, got {depth!r}")
    if m.name == "unipelt" and depth == "embedding":
        raise ConfigError("method=unipelt gates deep prefixes: method.depth must be 'deep' or a layer list, got 'embedding'")
    for key, value in (("seed", cfg.get("seed")), ("data.split.seed", (cfg.data.get("split") or {}).get("seed"))):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
    if "tasks" in cfg.data:  # several tasks, each checked as a run's own data config
        from peft_lightning import multitask

        multitask.validate(cfg)
    else:
        _validate_task(cfg.data)
        data = OmegaConf.to_container(cfg.data, resolve=True)
        _validate_source_keys(data)
        _validate_data(data, "data")
        for name, spec in (data.get("extra_eval") or {}).items():
            _validate_data({**data, **(spec or {})}, f"data.extra_eval.{name}")
    _validate_trainer(cfg.trainer, selects_on_dev(cfg))
    _validate_against_backbone(cfg)


# keys only a hub source reads: set for another source they are ignored, and the log says so
HUB_ONLY = ("subset", "splits", "dev_from_train")


def _validate_source_keys(data: dict) -> None:
    source = str(data.get("source") or "")
    if data.get("files") or not source.startswith("hub:"):
        given = [k for k in HUB_ONLY if data.get(k) is not None]
        if given:  # a warning, not an error: pointing a hub config at a local copy is the documented offline path
            what = "data.files" if data.get("files") else f"data.source={source}"
            log.warning("%s apply to hub: sources only and are not used with %s",
                        ", ".join(f"data.{k}" for k in given), what)
    if data.get("files") and data.get("split"):
        log.warning("data.split is not used with data.files (the files are the splits)")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _validate_data(data: dict, where: str) -> None:
    """Batch sizes, lengths and split fractions (`where`: data, or one of data.extra_eval's sets)."""
    for key in ("batch_size", "eval_batch_size", "max_length"):
        if key in data and not _positive_int(data[key]):
            raise ConfigError(f"{where}.{key} must be a positive integer, got {data[key]!r}")
    size = data.get("train_examples")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0
                             or (isinstance(size, float) and size > 1)):
        raise ConfigError(f"{where}.train_examples must be a positive count or a fraction in (0, 1], got {size!r}")
    workers = data.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"{where}.num_workers must be an integer >= 0, got {workers!r}")
    split = data.get("split")
    if split:
        from peft_lightning.data.datamodule import split_fractions

        split_fractions(split, where)


# Sharded strategies: refused, not half-supported. Every method keeps the backbone frozen and
# replicated; only the adapter's gradients are synchronised (DDP). FSDP/DeepSpeed would shard the
# frozen weights the prefix kernels, the hooks and the vocabulary-initialised prompts read whole
# (`init=vocab` copies rows of the full embedding matrix), and none of that has run sharded here.
SHARDED = ("fsdp", "deepspeed", "modelparallel")  # (ModelParallelStrategy: Lightning's FSDP2 + tensor parallel)


def sharded_strategy(strategy) -> str | None:
    """The sharded strategy `trainer.strategy` names (a registry string such as "fsdp" or
    "deepspeed_stage_3", or a node whose _target_ is an FSDP/DeepSpeed strategy class), else None."""
    name = strategy.get("_target_", "") if isinstance(strategy, (dict, DictConfig)) else strategy
    if not isinstance(name, str):
        return None
    low = name.rsplit(".", 1)[-1].lower().replace("_", "")
    return name if any(low.startswith(s) for s in SHARDED) else None


def _validate_trainer(trainer: DictConfig, selects: bool = True) -> None:
    import torch

    sharded = sharded_strategy(trainer.get("strategy"))
    if sharded:
        raise ConfigError(
            f"trainer.strategy={sharded} is not supported: peft-lightning trains with the frozen backbone "
            "replicated on every device and only the adapter's gradients synchronised (trainer=ddp, any "
            "trainer.num_nodes); sharding the frozen weights (FSDP, DeepSpeed) is untested with the prefix "
            "kernels and vocabulary-initialised prompts. Use trainer=ddp (trainer.num_nodes=N for several machines)")
    # Lightning would train forever, and the LR schedule (over trainer.estimated_stepping_batches, then
    # infinite) fails with an OverflowError; e.g. sweeps/transfer.yaml (max_epochs -1) with trainer.max_steps=-1
    if trainer.get("max_epochs") == -1 and trainer.get("max_steps", -1) == -1:
        raise ConfigError("trainer.max_epochs=-1 and trainer.max_steps=-1: no end to training (and no end for the "
                          "LR schedule to decay to); set trainer.max_steps (a budget of updates) or trainer.max_epochs")
    _warn_unvalidated_steps(trainer, selects)
    nodes = trainer.get("num_nodes", 1)
    if not (isinstance(nodes, int) and not isinstance(nodes, bool) and nodes >= 1):
        raise ConfigError(f"trainer.num_nodes={nodes!r} must be a whole number >= 1")
    accelerator = trainer.get("accelerator")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible here "
                              "(torch.cuda.is_available() is False); use trainer=cpu or trainer.accelerator=cpu")
        devices, count = trainer.get("devices", 1), torch.cuda.device_count()
        if isinstance(devices, str) and devices.isdigit():
            devices = int(devices)
        if isinstance(devices, int) and not isinstance(devices, bool) and devices > count:
            raise ConfigError(f"trainer.devices={devices} but {count} CUDA GPU(s) are visible here")


def selects_on_dev(cfg: DictConfig) -> bool:
    """Whether the tested and exported model is selected on dev: a multi-task run selects each task's
    best dev state itself (task_best), any other by a ModelCheckpoint that monitors a dev metric
    (callbacks=default's model_checkpoint; run.best_checkpoint_callback). Without one (callbacks=none;
    an EarlyStopping monitors but selects nothing) the last model is tested and exported."""
    import hydra
    from lightning.pytorch.callbacks import ModelCheckpoint

    if "tasks" in cfg.data:
        return True

    def checkpoint(target) -> bool:
        try:
            return issubclass(hydra.utils.get_class(target), ModelCheckpoint)
        except Exception:  # (a target that does not import fails when the run builds its callbacks)
            return False

    callbacks = cfg.get("callbacks") or {}
    return any(c and "_target_" in c and c.get("monitor") and checkpoint(c["_target_"]) for c in callbacks.values())


def _warn_unvalidated_steps(trainer: DictConfig, selects: bool = True) -> None:
    """Dev every val_check_interval batches across epochs (check_val_every_n_epoch: null, the low-data
    sweeps) never runs at the end of training on its own: a step budget that the interval does not
    divide trains updates that no validation sees and no selected checkpoint holds."""
    interval, steps = trainer.get("val_check_interval"), trainer.get("max_steps", -1)
    accumulate = trainer.get("accumulate_grad_batches", 1) or 1  # (the interval counts batches, max_steps updates)
    if (trainer.get("check_val_every_n_epoch", 1) is not None or isinstance(interval, bool)
            or not isinstance(interval, int) or interval <= 0 or not isinstance(steps, int) or steps <= 0):
        return
    if trainer.get("limit_val_batches") == 0:  # no update is validated: the run says so after the fit (selection: last)
        return
    if accumulate != 1 or trainer.get("max_epochs") not in (-1, None):
        # batches per update vary at epoch ends (Lightning steps on an epoch's last batch) and a finite
        # max_epochs may end training first: the last validated batch is not known here, only the risk
        log.warning("trainer.val_check_interval=%d batches across epochs (check_val_every_n_epoch: null) with "
                    "trainer.max_steps=%d, accumulate_grad_batches %d and max_epochs %s: updates after the last "
                    "multiple of the interval are never validated; with accumulate_grad_batches=1 and "
                    "max_epochs=-1, make max_steps a multiple of val_check_interval", interval, steps, accumulate,
                    trainer.get("max_epochs"))
        return
    last = steps - steps % interval
    if last == steps:
        return
    if not last:
        what = "no validation runs at all: nothing is selected on dev, the test metrics are the last model's"
    elif selects:
        what = (f"the last {steps - last} updates after update {last} are never validated, and the checkpoint "
                f"tested and exported is from update {last} at the latest")
    else:  # (callbacks=none: nothing is selected, the last model is tested whatever dev saw)
        what = (f"the last {steps - last} updates after update {last} are never validated, and the tested and "
                f"exported model is the last one (update {steps}), which no dev score saw")
    log.warning("trainer.max_steps=%d is not a multiple of trainer.val_check_interval=%d (check_val_every_n_epoch: "
                "null): %s; make max_steps a multiple of val_check_interval", steps, interval, what)


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
    _validate_max_length(cfg, config)
    if "prefix_length" in cfg.method:
        _warn_if_prompt_dominates(cfg, config)


def position_limit(config) -> int | None:
    """How many token positions a backbone can embed; None: relative positions only (T5,
    DeBERTa-v2/v3), nothing to overflow. Position ids beyond the table index past its end."""
    if config.model_type in ("t5", "mt5", "umt5", "longt5"):  # relative position buckets, any length
        return None
    if config.model_type.startswith("deberta") and not getattr(config, "position_biased_input", True):
        return None
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and config.model_type in ("roberta", "xlm-roberta", "camembert", "data2vec-text", "longformer"):
        # RoBERTa's position ids start after the padding index: pad_token_id + 1 rows are never used
        limit -= (config.pad_token_id or 0) + 1
    return limit


def _validate_max_length(cfg: DictConfig, config) -> None:
    """data.max_length against the backbone's position table. Prompts and prefixes take no
    positions here (injection/input_prompt.py and prefix.py give the real tokens positions
    0..L-1), so the prompt length does not count."""
    from peft_lightning.injection.architectures import ARCHITECTURES
    from peft_lightning.tasks.generation import DEFAULTS

    limit = position_limit(config)
    max_length = cfg.data.get("max_length", 128)  # TaskDataModule's default
    if limit is None:
        return
    if max_length > limit:
        raise ConfigError(f"data.max_length={max_length} is more than model={cfg.model.name} can embed: its position "
                          f"table has {limit} positions; set data.max_length={limit} or less")
    arch = ARCHITECTURES.get(config.model_type)
    if cfg.data.get("task") == "generation" and arch is not None and arch.kind == "decoder":
        new = (cfg.data.get("generation") or {}).get("max_new_tokens", DEFAULTS["max_new_tokens"])
        # generation starts from the source (truncated to max_length // 2) and appends max_new_tokens
        if max_length // 2 + new > limit:
            raise ConfigError(f"data.generation.max_new_tokens={new} after a source of up to data.max_length // 2 = "
                              f"{max_length // 2} tokens needs {max_length // 2 + new} positions; model="
                              f"{cfg.model.name} has {limit}")


def _warn_if_prompt_dominates(cfg: DictConfig, config) -> None:
    """Warn when the prompt alone outweighs the frozen model: counted on the meta device (shapes,
    no memory, no weights). For an encoder-decoder (more attention slots than layers) and with
    UniPELT's adapters and LoRA the trainable share is higher still: this is a lower bound."""
    import torch
    from transformers import AutoModel

    from peft_lightning.backbone import attention_geometry
    from peft_lightning.injection.prefix_encoder import PrefixEncoder
    from peft_lightning.injection.prompt_encoder import PromptEncoder

    m = cfg.method
    P, reparam, hidden = m.prefix_length, m.get("reparameterization", "none"), m.get("reparam_hidden", 512)
    depth = m.get("depth", "deep")
    with torch.device("meta"):
        backbone = AutoModel.from_config(config)
        if depth == "embedding":
            prompt = PromptEncoder(P, config.hidden_size, reparam, hidden, config.hidden_size)
        else:
            layers, kv_heads, head_dim = attention_geometry(config)
            slots = list(range(layers)) if depth == "deep" else list(depth)
            prompt = PrefixEncoder(P, slots, kv_heads, head_dim, reparam, hidden, embed_dim=config.hidden_size)
    trained = sum(p.numel() for p in prompt.parameters())
    frozen = sum(p.numel() for p in backbone.parameters())
    share = trained / (trained + frozen)
    if share > PROMPT_SHARE_WARNING:
        log.warning("method.prefix_length=%d: the prompt alone has %s parameters, %.0f%% of the model (%s in "
                    "model=%s); a prompt this long trains more than the model it adapts", P, f"{trained:,}",
                    100 * share, f"{frozen:,}", cfg.model.name)


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
    twice = sorted({str(x) for x in labels if [str(y) for y in labels].count(str(x)) > 1})
    if twice:
        raise ConfigError(f"data.labels names {twice} more than once: each label name is one class, in index order")
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
