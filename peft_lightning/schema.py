"""The config schema: every key a composed config may hold, declared once, checked before any model loads.

Hydra composes whatever it is given: a misspelt key added with `+` (`+method.prefix_lenght=64`,
`+data.file=x.csv`) sits beside the real one and the code, which reads the real one, silently
ignores it. `check_keys` walks the composed config against the declarations below and stops at the
first unknown key, naming it and the closest known key:

    config error: unknown key method.prefix_lenght (did you mean method.prefix_length?)

One declaration per thing:
  top level, paths       TOP, PATHS below
  model                  BackboneSpec's fields (what `build` passes it) + name
  method                 METHOD_KEYS: the knobs every method shares + each method's own; a test
                         checks them against conf/method/<name>.yaml
  data                   TaskDataModule's parameters (+ name, metric, extra_eval); per task type:
                         `columns` takes the task's roles, `generation` its options
  trainer, logger.*,     anything with `_target_` takes the target's keyword parameters, read with
  callbacks.*            inspect.signature (Trainer.__init__ for trainer), so they follow the installed version

A spec is ANY (any value), a dict (these keys, each with its spec), Each(spec) (free names, each
under spec: logger and callbacks entries, extra_eval sets), TARGET (an instantiated node), or a
function of the node that returns a spec (method by its name, data by its task).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Any

from peft_lightning.errors import ConfigError

ANY = None
TARGET = "target"
HYDRA_KEYS = ("_target_", "_args_", "_recursive_", "_convert_", "_partial_")


@dataclass(frozen=True)
class Each:
    """A mapping whose names are free (logger entries, extra_eval sets); each value under `spec`."""

    spec: Any


# --- methods ------------------------------------------------------------------------------------
_SHARED = {
    "name": ANY, "activation_checkpointing": ANY, "backbone_dropout": ANY,
    "head": {"type": ANY, "label_words": ANY, "pooling": ANY, "dropout": ANY},
    "optim": {"lr": ANY, "weight_decay": ANY, "warmup_ratio": ANY, "warmup_steps": ANY},
}
_PROMPT = dict.fromkeys(("prefix_length", "reparameterization", "reparam_hidden", "depth", "init", "init_text",
                         "init_from", "eject_on_export", "prefix_dropout", "cache_frozen_layers",
                         "recompute_attention"))
_ADAPTER = dict.fromkeys(("style", "bottleneck", "activation"))
# methods with LoRA's B matrices also take LoRA+'s learning-rate ratio for them
_LORA = {**dict.fromkeys(("r", "alpha", "dropout", "target_modules")),
         "optim": {**_SHARED["optim"], "lr_ratio": ANY}}
# each method's own keys (beside _SHARED); UniPELT's adapter is always Pfeiffer-style: no `style`
METHOD_KEYS: dict[str, dict] = {
    "ptuning_v2": _PROMPT, "prefix_tuning": _PROMPT, "prompt_tuning": _PROMPT, "p_tuning": _PROMPT,
    "adapter": _ADAPTER, "lora": _LORA, "dora": _LORA,
    "unipelt": {**_PROMPT, "bottleneck": ANY, "activation": ANY, **_LORA},
    "bitfit": {}, "finetune": {}, "ia3": {},
}
# keys a method takes that its yaml leaves out (they only matter with another key's value)
# (init_text: with init=text; init_from: with init=adapter, in the prompt methods' files; cache_frozen_layers,
# recompute_attention: deep prefixes, in their methods' files)
OPTIONAL_METHOD_KEYS = {"init_text", "init_from", "cache_frozen_layers", "recompute_attention"}


def other_methods_knob(where: str, method: Any = None) -> str | None:
    """For `method.<key>` that the run's method does not take but others do (`method.optim.lr_ratio` with
    P-Tuning v2, `method.prefix_length` with LoRA): which methods take it, instead of a did-you-mean
    that points at another knob (lr_ratio -> warmup_ratio); for a key no method takes whose closest
    match among every method's knobs is another method's (lr_ratoi), that knob and its methods. None
    otherwise: the run's own did-you-mean applies."""
    if not where.startswith("method."):
        return None
    parts = where.split(".")[1:]
    this = f"method={method}" if method else "this method"
    owners = _owners(parts)
    if owners and method not in owners:
        return (f"{where} is a knob of method={', '.join(owners)} only, not of {this}: drop it, or run one of "
                "those methods")
    if owners or method not in METHOD_KEYS:
        return None
    # a key no method takes: a typo of another method's knob (lr_ratoi) names that knob and its methods,
    # where the closest key of this method alone would point at an unrelated one (warmup_ratio)
    *path, key = parts
    siblings = {k for keys in METHOD_KEYS.values() for k in _at({**_SHARED, **keys}, path)}
    close = _closest(key, siblings)
    if not close or method in _owners([*path, close[0]]):
        return None
    others = ", ".join(_owners([*path, close[0]]))
    return (f"unknown key {where} (did you mean {'.'.join(['method', *path, close[0]])}? a knob of "
            f"method={others} only, not of {this})")


def swept_methods_knob(where: str, swept: str, override: str, default: Any = None) -> str:
    """`-m method=lora,dora method.optim.lr_ratio=4`: Hydra composes a sweep's config once with the
    default method before its jobs, so a knob of the swept methods that the default lacks is refused
    there, and the run's own message would name the default method, which nothing runs. `default`: the
    method that composition ran with (a typo's hint takes `++` where that method lacks the knob)."""
    names = _swept_names(swept)
    parts = where.split(".")[1:]
    owners = _owners(parts)
    if not owners:  # no method takes it: a typo, hinted from the swept methods' knobs
        known = {k for name in names or METHOD_KEYS for k in _at({**_SHARED, **METHOD_KEYS.get(name, {})}, parts[:-1])}
        close = _closest(parts[-1], known)
        if close:
            meant, owners = ".".join(["method", *parts[:-1], close[0]]), _owners([*parts[:-1], close[0]])
            others = [name for name in names if name not in owners]
            if others:  # (lr_ratoi in a sweep of lora and ptuning_v2: a ++ would fail the ptuning_v2 jobs)
                return (f"unknown key {where} (did you mean {meant}? a knob of method={', '.join(owners)} only, not of "
                        f"method={', '.join(others)} in this sweep: sweep those methods only, with "
                        f"++{meant}={override.partition('=')[2]})")
            plus = "" if default in owners else "++"
            return f"unknown key {where} (did you mean {plus}{meant}?)"
        node = ".".join(["method", *parts[:-1]])
        return f"unknown key {where}; the swept methods' {node} takes {', '.join(sorted(known)) or 'no keys'}"
    others = [name for name in names if name not in owners]
    if others:
        return (f"{where} is a knob of method={', '.join(sorted(owners))} only, not of method={', '.join(others)} "
                f"in this sweep: sweep those methods only, with ++{override}")
    return (f"{where}: Hydra checks a sweep's overrides against the default method before the jobs of "
            f"method={swept} run; write ++{override} (it sets the key in every job)")


def _swept_names(swept: str) -> list[str]:
    """The methods a sweep's `method=<swept>` runs, as Hydra reads it: a list or choice(...) as written,
    glob(...) matched against the method configs (glob(*) sweeps every method, most of which lack a
    LoRA knob: its ++ would fail their jobs); [] where Hydra cannot parse it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, Glob

    try:
        value = OverridesParser.create().parse_override(f"method={swept}").value()
    except Exception:  # noqa: BLE001  (not Hydra's syntax: Hydra itself reports it)
        return []
    if isinstance(value, Glob):
        return value.filter(sorted(METHOD_KEYS))
    if isinstance(value, ChoiceSweep):
        return [str(getattr(v, "text", v)) for v in value.list]  # ("lora": a QuotedString)
    if isinstance(value, str):  # one method (a sweep config's `method: lora`, applied in the jobs only)
        return [value]
    return []  # (range(...), interval(...): numbers, no method's name)


def _owners(parts: list[str]) -> list[str]:
    """The methods whose config takes method.<parts joined by dots>, sorted."""
    return sorted(name for name, keys in METHOD_KEYS.items() if parts[-1] in _at({**_SHARED, **keys}, parts[:-1]))


def _at(spec: Any, path: list[str]) -> dict:
    """The keys of a method spec under `path` ({} where the path leads nowhere)."""
    for part in path:
        spec = spec.get(part) if isinstance(spec, dict) else None
    return spec if isinstance(spec, dict) else {}


def method_schema(node: dict) -> dict:
    name = node.get("name")
    if name not in METHOD_KEYS:
        raise ConfigError(f"method.name must be one of {sorted(METHOD_KEYS)}, got {name!r}{_hint(name, METHOD_KEYS)}")
    return {**_SHARED, **METHOD_KEYS[name]}


# --- data ---------------------------------------------------------------------------------------
SPLITS = dict.fromkeys(("train", "validation", "test"))
# TaskDataModule parameters that `build` fills in itself, not from data.*
_DATAMODULE_OWN = {"self", "tokenizer", "cache_dir", "seed"}
# what an extra evaluation set may replace: where its data comes from and how it is batched (the
# run's task, labels and metric apply to it; its test split is used)
_EXTRA_EVAL_FIXED = {"name", "task", "labels", "metric", "generation", "extra_eval", "train_examples"}


# several tasks in one run (peft_lightning/multitask.py); each entry of `tasks` is checked as a data config
MULTITASK_DATA = dict.fromkeys(("name", "tasks", "sampling", "temperature", "metric", "max_length", "batch_size",
                                "eval_batch_size", "num_workers"))


def data_schema(node: dict, extra: bool = False) -> dict:
    from peft_lightning.data import TaskDataModule
    from peft_lightning.tasks import TASKS
    from peft_lightning.tasks.generation import DEFAULTS as GENERATION_OPTIONS

    if "tasks" in node and not extra:
        return MULTITASK_DATA
    name = node.get("task", "classification")
    if name not in TASKS:
        raise ConfigError(f"data.task must be one of {sorted(TASKS)}, got {name!r}{_hint(name, TASKS)}")
    task = TASKS[name]
    params = inspect.signature(TaskDataModule.__init__).parameters.values()
    spec: dict = {p.name: ANY for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in _DATAMODULE_OWN}
    spec.update(name=ANY, metric=ANY, split={**SPLITS, "seed": ANY}, splits=SPLITS, files=SPLITS,
                columns=dict.fromkeys((*task.roles, *task.optional_roles)),
                extra_eval=Each(lambda n: data_schema({**n, "task": name}, extra=True)))
    if name == "generation":
        spec["generation"] = dict.fromkeys(GENERATION_OPTIONS)
    if extra:
        spec = {k: v for k, v in spec.items() if k not in _EXTRA_EVAL_FIXED}
    return spec


# --- the rest -----------------------------------------------------------------------------------
def model_schema(node: dict) -> dict:
    from peft_lightning.backbone import BackboneSpec

    return {"name": ANY, **{f.name: ANY for f in dataclasses.fields(BackboneSpec)}}


PATHS = dict.fromkeys(("root_dir", "log_dir", "output_dir", "cache_dir"))
# run.py passes these to the Trainer itself: a value in trainer.* would be silently replaced
TRAINER_SET_BY_RUN = {"callbacks": "the callbacks group (callbacks=..., +callbacks.<name>=...)",
                      "logger": "the logger group (logger=...)", "plugins": "run.py (atomic checkpoint writes)"}
TOP = {
    "task_name": ANY, "seed": ANY, "ckpt_path": ANY, "test": ANY, "eval_before_training": ANY,
    "model": model_schema, "method": method_schema, "data": data_schema, "trainer": TARGET,
    "logger": Each(TARGET), "callbacks": Each(TARGET), "paths": PATHS,
}


def check_keys(cfg: dict) -> None:
    """Raise ConfigError at the first key of `cfg` (a plain, unresolved container of the composed
    config) that no declaration knows, or at a group node of the wrong shape."""
    _check({k: v for k, v in cfg.items() if k != "hydra"}, TOP, "")


def own_method_keys(method: dict) -> dict:
    """`method` without the keys its method does not read (knobs of other methods a Python caller
    passed along, in `optim` and `head` too): what an adapter saves, so that its config passes
    `check_method` on reload."""
    def own(node: dict, spec: dict) -> dict:
        return {k: own(v, spec[k]) if isinstance(v, dict) and isinstance(spec[k], dict) else v
                for k, v in node.items() if k in spec}

    return own(method, method_schema(method))


def check_method_keys_exist(method: dict) -> None:
    """A method config built in Python (not composed by Hydra): a key that NO method reads is a
    typo that would be silently ignored (`prefix_lenght`, `optim.lr_ratoi`); knobs of other methods
    are tolerated, as shared dicts of knobs are common in scripts."""
    def known_keys(path: tuple[str, ...]) -> set:
        specs = [{**_SHARED, **keys} for keys in METHOD_KEYS.values()]
        for key in path:
            specs = [spec[key] for spec in specs if isinstance(spec.get(key), dict)]
        return set().union(*specs)

    def check(node: dict, path: tuple[str, ...]) -> None:
        known = known_keys(path)
        where = ".".join(("method", *path))
        for key, value in node.items():
            if key not in known:
                raise ConfigError(f"unknown key {where}.{key}{_hint(key, known, where)}")
            if isinstance(value, dict) and known_keys((*path, key)):
                check(value, (*path, key))

    check(method, ())


def check_data(node: dict, path: str = "data") -> None:
    """One data config (a multi-task run's task, `path` data.tasks.<name>): unknown keys are errors."""
    _check(node, data_schema, path)


def check_method(method: dict) -> None:
    """A method config alone (an adapter's adapter_config.json holds one): unknown keys are errors."""
    _check(method, method_schema, "method")


def _check(node: Any, spec: Any, path: str, method: Any = None) -> None:
    """`node` against `spec`; `method`: the run's method name, for an error on a key of other methods"""
    if spec is ANY or node is None or _interpolation(node):
        return
    if isinstance(spec, Each):
        for name, value in _mapping(node, path, "a mapping of names to settings").items():
            _check(value, spec.spec, f"{path}.{name}", method)
        return
    if spec == TARGET:
        return _check_target(node, path)
    if callable(spec):
        node = _mapping(node, path, "a mapping")
        if path == "method":
            method = node.get("name")
        spec = spec(node)
    node = _mapping(node, path, f"a mapping with keys {sorted(spec)}")
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in spec:
            raise ConfigError(other_methods_knob(where, method) or f"unknown key {where}{_hint(key, spec, path)}")
        _check(value, spec[key], where, method)


def _check_target(node: Any, path: str) -> None:
    """An instantiated node: its keys are the target's keyword parameters (anything if it takes
    **kwargs); nested instantiated nodes (trainer.strategy) are checked the same way."""
    from hydra._internal.utils import _locate  # what hydra.utils.instantiate resolves _target_ with

    node = _mapping(node, path, "a mapping with _target_")
    if not node:
        return  # an emptied entry (logger.csv={}): run.py skips it
    target = node.get("_target_")
    if not isinstance(target, str):
        raise ConfigError(f"{path} needs _target_ (the class or function to instantiate), got keys {sorted(node)}")
    try:
        obj = _locate(target)
    except Exception as err:  # ImportError, AttributeError, ...: hydra wraps them differently by version
        raise ConfigError(f"{path}._target_={target!r} cannot be imported: {' '.join(str(err).split())}") from None
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        params = None
    takes_any = params is None or any(p.kind is p.VAR_KEYWORD for p in params.values())
    known = {*HYDRA_KEYS, *(params or {})}
    for key, value in node.items():
        where = f"{path}.{key}"
        if path == "trainer" and key in TRAINER_SET_BY_RUN:
            raise ConfigError(f"{where} cannot be set: it comes from {TRAINER_SET_BY_RUN[key]}")
        if not takes_any and key not in known:
            raise ConfigError(f"unknown key {where}, not an argument of {target}"
                              f"{_hint(key, known - set(HYDRA_KEYS), path)}")
        if isinstance(value, dict) and "_target_" in value:
            _check_target(value, where)


def _mapping(node: Any, path: str, what: str) -> dict:
    if not isinstance(node, dict):
        raise ConfigError(f"{path} must be {what}, got {node!r}")
    return node


def _interpolation(node: Any) -> bool:
    return isinstance(node, str) and node.startswith("${")


def _closest(key: Any, known) -> list[str]:
    """The known name closest to a mistyped one ([name]), or [] when none is close: every
    did-you-mean here (config keys, Hydra's groups, options and Trainer arguments)."""
    return difflib.get_close_matches(str(key), sorted(str(k) for k in known), n=1)


def _hint(key: Any, known, path: str | None = None) -> str:
    """' (did you mean <path>.<closest>?)', or the known keys when none is close."""
    known = sorted(str(k) for k in known)
    close = _closest(key, known)
    if path is None:
        return f" (did you mean {close[0]!r}?)" if close else ""
    if close:
        return f" (did you mean {path + '.' if path else ''}{close[0]}?)"
    return f"; {path or 'the top level'} takes {', '.join(known)}"


def hydra_error_message(err: BaseException, argv: list[str] | None = None) -> str | None:
    """One line for a command line Hydra cannot compose (an unknown key without `+`, a config group or
    option that does not exist, an override it cannot parse), or None for any other error. Hydra would
    print several lines and exit 1, where every other config mistake here exits 2 with one line. Also
    an interpolation that resolves to no key, resolver or value (raised when the run reads it), and an
    override Hydra fails to apply without wrapping the error (a list indexed by a name). `argv`: the
    command line, whose overrides a hint repeats as typed (Hydra names one job's value of a sweep
    `a=1,2`)."""
    from hydra._internal.utils import _locate
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf import DictConfig
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, GrammarParseError, InterpolationKeyError,
                                  InterpolationToMissingValueError, UnsupportedInterpolationType)

    typed = {}  # key -> the override as typed (the last one wins, as in Hydra); `+`, `~` and `@package` left out
    for arg in argv or []:
        key, eq, _ = arg.partition("=")
        if eq and not arg.startswith("-"):
            typed[key.lstrip("+~").split("@")[0]] = arg.lstrip("+~")
    if isinstance(err, MissingConfigException) and err.options is not None:  # method=lorra
        group, _, option = (err.missing_cfg_file or "").rpartition("/")
        known = sorted(err.options)
        close = _closest(option, known)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        where = "" if group in typed or argv is None else " (not on the command line: a preset or config file sets it)"
        return f"{group}={option}: no such {group} config{hint}; {group} takes {', '.join(known)}{where}"
    cause = err.__cause__
    if isinstance(err, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)) \
            and getattr(cause, "full_key", None) and getattr(cause, "parent_node", None) is not None:
        path, _, key = cause.full_key.rpartition(".")  # trainer.max_stepz, or methd at the top level
        listed = {str(k) for k in cause.parent_node.keys()}
        arguments = set()  # a node Hydra instantiates (trainer) takes its class's arguments, listed or not
        target = cause.parent_node.get("_target_") if isinstance(cause.parent_node, DictConfig) else None
        if isinstance(target, str):
            try:
                arguments = set(inspect.signature(_locate(target)).parameters) - {"self", "args", "kwargs"}
            except Exception:  # noqa: BLE001  (not importable or no signature: the listed keys only)
                pass
        # the override as typed, else Hydra's `+key=value` (the rest of its message: a value may hold spaces)
        hydras = re.search(r"use (\+.+)$", str(err))
        append = f"+{typed[cause.full_key]}" if cause.full_key in typed else \
            hydras.group(1) if hydras else f"+{cause.full_key}=..."
        if key in arguments:  # a real argument the config does not list: only `+` adds it
            return f"{cause.full_key} is not in the config: add it with {append}"
        if cause.full_key.startswith("method."):  # a knob of other methods, or this one's left out of its yaml
            from omegaconf import OmegaConf
            try:  # (the composed config's method, whichever preset or default chose it)
                method = OmegaConf.select(cause.parent_node._get_root(), "method.name", default=None)
            except Exception:  # noqa: BLE001  (an OmegaConf without _get_root: the override as typed)
                method = typed.get("method", "").partition("=")[2] or None
            swept, configured = typed.get("method", "").partition("=")[2], ""
            if not swept:  # +sweeps=methods: the sweep config's list, in a multirun (-m, or hydra.mode: MULTIRUN)
                try:
                    root = cause.parent_node._get_root()
                    mode = OmegaConf.select(root, "hydra.mode", default=None)
                    if {"-m", "--multirun"} & set(argv or []) or "MULTIRUN" in (
                            typed.get("hydra.mode", "").partition("=")[2], getattr(mode, "name", mode)):
                        configured = str(OmegaConf.select(root, "hydra.sweeper.params.method", default="") or "")
                except Exception:  # noqa: BLE001  (no root to read: the run's own message)
                    configured = ""
                # one method too (`method: lora`): its jobs run it, where the composition ran the default
                swept = configured if configured != method else ""
            # -m method=lora,dora (or glob(...), choice(...)), or the sweep config's method(s)
            if (swept and swept == configured) or "," in swept or re.match(r"\w+\(", swept):
                return swept_methods_knob(cause.full_key, swept, typed.get(cause.full_key, f"{cause.full_key}=..."),
                                          method)
            other = other_methods_knob(cause.full_key, method)
            if other:
                return other
            if method in METHOD_KEYS and other_methods_knob(cause.full_key) is not None:
                return f"{cause.full_key} is not in method={method}'s config: add it with {append}"
            if path == "method" and method in METHOD_KEYS:  # this method's knobs its yaml leaves out (init_text)
                arguments = OPTIONAL_METHOD_KEYS & set(METHOD_KEYS[method])
        close = _closest(key, listed | arguments)
        where = f"{path}." if path else ""
        if close:
            plus = "+" if close[0] not in listed else ""
            return f"unknown key {cause.full_key} (did you mean {plus}{where}{close[0]}?)"
        return (f"unknown key {cause.full_key}; {path or 'the top level'} has "
                + (", ".join(sorted(listed)) or "no keys")
                + (f" and takes the other arguments of {target} with +{where}<argument>=..." if arguments and target
                   else f" and takes {', '.join(f'+{where}{a}' for a in sorted(arguments - listed))}"
                   if arguments - listed else ""))
    if isinstance(err, (ConfigCompositionException, OverrideParseException)):
        return " ".join(f"{err} {cause or ''}".split())
    if isinstance(err, ValueError) and str(err).startswith("Only one of --run, --multirun"):  # Hydra's own check
        return (f"{err} (`-m --cfg job`: print one job's config without -m, one value per swept key; "
                "`--info`: without -m too)")
    # an interpolation in the config that names no key or resolver (`${nope}`) or a missing value: raised
    # where the value is first read, in the run. (Not an error a resolver's own code raised: a bug there
    # keeps its traceback.)
    if isinstance(err, (InterpolationKeyError, InterpolationToMissingValueError, UnsupportedInterpolationType,
                        GrammarParseError)) and getattr(err, "full_key", None):
        return f"{err.full_key}: {str(err).splitlines()[0]}"
    return _unapplied_override(err)


def _unapplied_override(err: BaseException) -> str | None:
    """An override Hydra failed to apply without wrapping what OmegaConf raised (`data.labels.x=1`:
    a list indexed by a name is a bare ValueError): the override and why, found in the traceback's
    frame of Hydra's override loop; None for an error raised anywhere else."""
    from omegaconf import ListConfig, OmegaConf

    tb = err.__traceback__
    while tb is not None and not (tb.tb_frame.f_code.co_name == "_apply_overrides_to_config"
                                  and "hydra" in tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    override = tb.tb_frame.f_locals.get("override") if tb is not None else None
    if override is None or not hasattr(override, "input_line"):
        return None
    hint, cfg, parts = "", tb.tb_frame.f_locals.get("cfg"), str(override.key_or_group).split(".")
    for i in range(1, len(parts)):  # the first list on the key's path (its items are named by number)
        prefix = ".".join(parts[:i])
        try:
            node = OmegaConf.select(cfg, prefix, throw_on_missing=False)
        except Exception:  # noqa: BLE001  (the path goes through a value: no hint)
            break
        if isinstance(node, ListConfig):
            hint = f" ({prefix} is a list: its items are {prefix}.0 to {prefix}.{len(node) - 1})" if len(node) \
                else f" ({prefix} is an empty list)"
            break
    return f"cannot apply {override.input_line}: {type(err).__name__}: {err}{hint}"
