"""Prompt transfer (SPoT, Vu et al., 2022): start a prompt method from another run's prompt.

    python train.py data=sms_spam hydra.run.dir=outputs/spot_source             # the source task
    python train.py method.init=adapter method.init_from=outputs/spot_source/adapter data.train_examples=100

`method.init=adapter` reads the adapter folder `method.init_from` (what every run writes to
<run>/adapter) and starts this run's prompt from the source's:

  what moves     the prompt only: the deep prefix (ptuning_v2, prefix_tuning) or the input-level
                 prompt (prompt_tuning, p_tuning); methods may differ if the shapes agree. The head
                 is NOT transferred: the target task has its own labels, and a head fitted to
                 other labels is no better a start than a fresh one.
  the source's prompt   what it computes: its flat table; a reparameterized source's network ejected
                 at export (prefix_tuning's default) saved that table; a source that kept its
                 network (eject_on_export=false) has it run once here.
  target reparameterization=none   that prompt, exactly, as the free table's start.
  target reparameterized (mlp/lstm)   the source's network and input table are loaded, so the
                 network computes exactly the source's prompt and training goes on in the source's
                 parameterization. This needs the source to have kept the same network (the same
                 reparameterization and reparam_hidden, eject_on_export=false); an ejected or
                 otherwise parameterized source is refused, since no network maps its input table
                 onto a given prompt (method.reparameterization=none starts a free table from it).
  checks         before anything is written, each mismatch a one-line ConfigError naming the key:
                 the backbone (model.name_or_path / model.config, and for a randomly initialised
                 backbone its saved weights), input prompt vs deep prefix and which layers,
                 prefix_length, the reparameterization network's shape.

The adapter this run saves is complete without the source (its tensors are the trained prompt):
its config says init=random, and the source is recorded in results.json's overrides. A resume
(ckpt_path) rebuilds the run, so the source folder must still be there.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from peft_lightning.errors import AdapterError, ConfigError
from peft_lightning.injection import PromptEncoder, install_prefix_attention

log = logging.getLogger(__name__)

# methods whose whole trainable part (besides the head) is a prompt; UniPELT's prefix is gated
PROMPT_METHODS = ("ptuning_v2", "prefix_tuning", "prompt_tuning", "p_tuning")


def init_from_adapter(target, path) -> None:
    """Write the prompt of the adapter folder `path` into `target`'s (a PromptMethod, built)."""
    from peft_lightning.checkpoint import BACKBONE, CONFIG, WEIGHTS, _load_tensors, read_config
    from peft_lightning.methods.prompting import parse_depth

    where = f"method.init_from={path}"
    if target.method_cfg["name"] not in PROMPT_METHODS:
        raise ConfigError(f"method.init=adapter starts a prompt method ({', '.join(PROMPT_METHODS)}), not "
                          f"method={target.method_cfg['name']}")
    if not path:
        raise ConfigError("method.init=adapter needs method.init_from: a trained adapter folder (<run>/adapter)")
    folder = Path(str(path)).expanduser()
    if not (folder / CONFIG).is_file():
        raise ConfigError(f"{where}: no {CONFIG} there; point it at a run's adapter folder (<run>/adapter)")
    try:
        config = read_config(folder / CONFIG)
        tensors = _load_tensors(folder / WEIGHTS)
    except AdapterError as err:
        raise ConfigError(f"{where}: {err}") from None
    method = config["method"]
    if method["name"] not in PROMPT_METHODS:
        raise ConfigError(f"{where} holds a method={method['name']} adapter; prompt transfer starts from a prompt "
                          f"({', '.join(PROMPT_METHODS)})")
    _check_backbone(config["model"], folder / BACKBONE, target, where)
    backbone_config = target.backbone.config
    try:
        depth = parse_depth(method.get("depth", "deep"), backbone_config.num_hidden_layers)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    deep = target.prefix is not None
    if (depth != "embedding") != deep:
        have = f"method.depth={target.method_cfg.get('depth', 'deep')}"
        raise ConfigError(f"{where} holds {'deep prefixes' if depth != 'embedding' else 'an input-level prompt'} "
                          f"(method.depth={method.get('depth', 'deep')}), this run has "
                          f"{'deep prefixes' if deep else 'an input-level prompt'} ({have}): set "
                          f"method.depth={method.get('depth', 'deep')}")
    if deep:
        slots = install_prefix_attention(target.backbone)  # (already installed: returns the slots)
        chosen = [i for i, s in enumerate(slots) if depth == "deep" or s.layer in depth]
        if chosen != target.prefix.slots:
            raise ConfigError(f"{where} has prefixes in attention slots {chosen} (method.depth={method.get('depth')}), "
                              f"this run in {target.prefix.slots} (method.depth={target.method_cfg.get('depth')}): "
                              f"set method.depth={method.get('depth')}")
    length = int(method["prefix_length"])
    if length != target.prefix_length:
        raise ConfigError(f"{where} has method.prefix_length={length}, this run {target.prefix_length}: set "
                          f"method.prefix_length={length}")
    # the source's own encoder, rebuilt from its file (strict: every tensor, each of its shape)
    encoder = target.prompt_encoder
    reparam = method.get("reparameterization", "none")
    hidden = int(method.get("reparam_hidden", 512))
    source = PromptEncoder(length, encoder.out_dim, reparam, hidden, backbone_config.hidden_size)
    name = "prefix.encoder." if deep else "prompt."
    try:
        source.load_state_dict({k[len(name):]: v for k, v in tensors.items() if k.startswith(name)})
    except RuntimeError as err:
        raise ConfigError(f"{where}: its prompt tensors do not fit its own config ({' '.join(str(err).split())[:300]})"
                          ) from None
    with torch.no_grad():
        if encoder.net is None:  # a free table: the source's prompt, as it computes it
            flat = source.eval()().to(encoder().dtype)
            (encoder.set_flat if deep else encoder.embedding.weight.copy_)(flat)
        else:
            cfg = target.method_cfg
            own, theirs = (cfg.get("reparameterization"), cfg.get("reparam_hidden", 512)), (reparam, hidden)
            if source.net is None:
                raise ConfigError(
                    f"this run reparameterizes its prompt (method.reparameterization={own[0]}) but {where} holds a "
                    "flat prompt (no network: reparameterization none, or ejected at export): no network maps its "
                    "table onto that prompt. Set method.reparameterization=none to start a free table from it, or "
                    "train the source with the same network and method.eject_on_export=false")
            if own != theirs:
                raise ConfigError(f"{where} has method.reparameterization={theirs[0]}, reparam_hidden={theirs[1]}; "
                                  f"this run {own[0]}, {own[1]}: set them to the source's to continue its network")
            encoder.load_state_dict(source.state_dict())
            encoder.clear_cache()
    log.info("method.init=adapter: the %s of %s (method=%s, %s), head not transferred",
             "prefix" if deep else "prompt", folder, method["name"],
             "network loaded" if encoder.net is not None else "its computed prompt")


def _check_backbone(model: dict, backbone_file: Path, target, where: str) -> None:
    """The source was trained on this run's backbone: the same name or path, or the same config
    and, for a randomly initialised backbone, the same weights (a seed's). The attention
    implementation and the tokenizer's location do not change the backbone's weights."""
    own = target.hparams.model
    if (model.get("name_or_path"), model.get("config")) != (own.get("name_or_path"), own.get("config")):
        def name(m):
            return f"model.name_or_path={m['name_or_path']}" if m.get("name_or_path") else \
                f"model.config={m.get('config')}"

        raise ConfigError(f"{where} was trained on {name(model)}, this run uses {name(own)}: a prompt lives in one "
                          "backbone's embedding and key/value spaces")
    if model.get("config") is None:
        return
    from safetensors.torch import load_file

    if not backbone_file.is_file():
        raise ConfigError(f"{where}: {backbone_file.name} is missing; a randomly initialised backbone's weights are "
                          "saved with the adapter")
    saved, here = load_file(str(backbone_file)), target.backbone.state_dict()
    if any(k in here and not torch.equal(v, here[k].detach().cpu()) for k, v in saved.items()):
        raise ConfigError(f"{where} was trained on a randomly initialised backbone (model.config) with other weights "
                          "than this run's (another seed?): its prompt does not fit this backbone")
