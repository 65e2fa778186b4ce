"""Config schema (issue 14, items 6 and 15): an unknown key, a misspelt preset or a bad value is an
error naming it, before any model loads; the schema's declarations match the config files."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml
from test_configs import CONF, compose_cfg

from peft_lightning.errors import ConfigError
from peft_lightning.validation import validate_config

ROOT = CONF.parent
FAULT = "+callbacks.fault._target_=peft_lightning.faults.FaultInjection"


@pytest.fixture
def no_weights(monkeypatch):
    """Validation must decide before any model is loaded."""
    import peft_lightning.backbone as backbone

    def load_backbone(*a, **k):
        raise AssertionError("a model was loaded before validation")

    monkeypatch.setattr(backbone, "load_backbone", load_backbone)


# --- unknown keys: the key and the closest known one --------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    # the two: a typo Hydra itself suggests adding with +, and data.file for data.files
    (["+method.prefix_lenght=64"], r"^unknown key method.prefix_lenght \(did you mean method.prefix_length\?\)$"),
    (["+data.file=x.csv"], r"^unknown key data.file \(did you mean data.files\?\)$"),
    (["+seeed=3"], r"^unknown key seeed \(did you mean seed\?\)$"),
    (["+model.name_or_pth=x"], r"^unknown key model.name_or_pth \(did you mean model.name_or_path\?\)$"),
    (["+method.head.pooing=mean"], r"^unknown key method.head.pooing \(did you mean method.head.pooling\?\)$"),
    (["+method.optim.wd=0.1"], r"^unknown key method.optim.wd; method.optim takes lr, warmup_ratio, warmup_steps, weight_decay$"),
    # a key of another method: LoRA has no prefix, UniPELT's adapter has no style, (IA)³ no LoRA+ ratio: the
    # methods that take it, not a did-you-mean pointing at another knob
    (["method=lora", "+method.prefix_length=8"], r"^method.prefix_length is a knob of method=p_tuning, prefix_tuning, "
                                                 r"prompt_tuning, ptuning_v2, unipelt only, not of method=lora: drop it"),
    (["method=unipelt", "+method.style=houlsby"], r"^method.style is a knob of method=adapter only, not of method=unipelt"),
    (["method=ia3", "+method.optim.lr_ratio=16"], r"^method.optim.lr_ratio is a knob of method=dora, lora, unipelt only, "
                                                  r"not of method=ia3: drop it, or run one of those methods$"),
    # a typo of another method's knob: that knob and its methods (not this method's closest, warmup_ratio)
    (["+method.optim.lr_ratoi=16"], r"^unknown key method.optim.lr_ratoi \(did you mean method.optim.lr_ratio\? a "
                                    r"knob of method=dora, lora, unipelt only, not of method=ptuning_v2\)$"),
    (["method=lora", "+method.prefix_lenght=8"], r"^unknown key method.prefix_lenght \(did you mean "
                                                 r"method.prefix_length\? a knob of method=p_tuning, "),
    (["method=lora", "+method.optim.lr_ratoi=16"], r"^unknown key method.optim.lr_ratoi \(did you mean "
                                                   r"method.optim.lr_ratio\?\)$"),  # LoRA's own knob
    (["+data.split.tset=0.1"], r"^unknown key data.split.tset \(did you mean data.split.test\?\)$"),
    (["+data.columns.txt=sentence"], r"^unknown key data.columns.txt \(did you mean data.columns.text\?\)$"),
    (["+data.files={train: a.csv, validation: b.csv, tset: c.csv}"],
     r"^unknown key data.files.tset \(did you mean data.files.test\?\)$"),
    (["+data.files=a.csv"], r"^data.files must be a mapping with keys \['test', 'train', 'validation'\], got 'a.csv'$"),
    (["data=city_facts", "+data.generation.beams=2"],
     r"^unknown key data.generation.beams \(did you mean data.generation.num_beams\?\)$"),
    (["+data.generation={num_beams: 2}"], r"^unknown key data.generation; data takes "),  # a classification task
    (["+data.extra_eval={other: {file: {test: o.csv}}}"],
     r"^unknown key data.extra_eval.other.file \(did you mean data.extra_eval.other.files\?\)$"),
    (["+data.extra_eval={other: {task: regression}}"], r"^unknown key data.extra_eval.other.task; "),
    (["+trainer.max_epoch=5"], r"^unknown key trainer.max_epoch, not an argument of lightning.pytorch.trainer.Trainer "
                               r"\(did you mean trainer.max_epochs\?\)$"),
    (["+trainer.logger=false"], r"^trainer.logger cannot be set: it comes from the logger group"),
    (["+callbacks.model_checkpoint.save_top_kk=3"], r"^unknown key callbacks.model_checkpoint.save_top_kk, not an "
                                                    r"argument of .*ModelCheckpoint \(did you mean .*save_top_k\?\)$"),
    (["logger=csv", "+logger.csv.save_dri=x"], r"^unknown key logger.csv.save_dri, .*\(did you mean logger.csv.save_dir\?\)$"),
    ([FAULT, "+callbacks.fault.signal_at_stp=3"], r"\(did you mean callbacks.fault.signal_at_step\?\)$"),
    (["+logger.mine._target_=lightning.pytorch.loggers.CSVLoger"], r"^logger.mine._target_='lightning.pytorch.loggers."
                                                                   r"CSVLoger' cannot be imported"),
    (["+callbacks.mine.monitor=val/acc"], r"^callbacks.mine needs _target_"),
    (["+paths.cache_dri=x"], r"^unknown key paths.cache_dri \(did you mean paths.cache_dir\?\)$"),
    (["method.name=ptuning_v3"], r"^method.name must be one of \[.*\], got 'ptuning_v3' \(did you mean 'ptuning_v2'\?\)$"),
    (["data.task=classifcation"], r"^data.task must be one of \[.*\], got 'classifcation' \(did you mean 'classification'\?\)$"),
])
def test_unknown_key_names_the_key_and_the_closest(overrides, message, no_weights):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg(overrides))


def test_known_added_keys_pass(no_weights):
    """Keys the docs and tests add with + are all declared."""
    validate_config(compose_cfg(["+trainer.limit_train_batches=2", "+data.files={train: a, validation: b, test: c}",
                                 "+data.extra_eval={other: {files: {test: o.csv}, columns: {text: t, label: y}}}",
                                 FAULT, "+callbacks.fault.signal_at_step=3", "method=prompt_tuning",
                                 "method.init=text", "+method.init_text=a review", "++data.train_examples=0.5"]))


def test_schema_matches_the_method_files():
    """Each method's declared keys are exactly the keys of conf/method/<name>.yaml (plus the
    optional init_text), and every method the code has is declared."""
    from peft_lightning.methods import METHODS
    from peft_lightning.schema import METHOD_KEYS, OPTIONAL_METHOD_KEYS, method_schema

    assert set(METHOD_KEYS) == set(METHODS)
    for path in sorted((CONF / "method").glob("*.yaml")):
        file = yaml.safe_load(path.read_text())
        schema = method_schema(file)
        assert set(file) <= set(schema), path.name
        assert set(schema) - set(file) <= OPTIONAL_METHOD_KEYS, (path.name, set(schema) - set(file))
        for nested in ("head", "optim"):
            assert set(file[nested]) == set(schema[nested]), (path.name, nested)


def test_schema_covers_the_top_level_of_train_yaml():
    from peft_lightning.schema import TOP

    train = yaml.safe_load((CONF / "train.yaml").read_text())
    groups = {next(iter(d)).split()[-1] if isinstance(d, dict) else d for d in train["defaults"]}
    assert set(train) - {"defaults", "hydra"} <= set(TOP)
    # experiment and debug are _global_ presets and hydra is Hydra's own: no key of theirs
    assert groups - {"_self_", "hydra", "experiment", "debug"} <= set(TOP)


# --- misspelt presets: Hydra's list of options, not the default run ------------------------------
def _train(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("override,message", [
    ("experiment=ptuning_v2_rtt", "experiment=ptuning_v2_rtt: no such experiment config (did you mean "
                                  "experiment=ptuning_v2_rt?); experiment takes prefix_tuning_official, "
                                  "ptuning_v2_official, ptuning_v2_rt, smollm2_city_facts"),
    ("debug=fast_dev_rn", "debug=fast_dev_rn: no such debug config (did you mean debug=fast_dev_run?); debug takes "
                          "fast_dev_run, limit, overfit"),
    # keys Hydra cannot set (not in the config): a typo, and a real Trainer argument given without `+`
    ("trainer.max_stepz=3", "unknown key trainer.max_stepz (did you mean +trainer.max_steps?)"),
    ("trainer.max_steps=3", "trainer.max_steps is not in the config: add it with +trainer.max_steps=3"),
    ("methd=lora", "unknown key methd (did you mean method?)"),
    ("method.prefix_lenght=64", "unknown key method.prefix_lenght (did you mean method.prefix_length?)"),
    # another method's knob (not "did you mean method.optim.warmup_ratio?"), and this method's own knob its yaml
    # leaves out (not "did you mean method.init?")
    ("method.optim.lr_ratio=16", "method.optim.lr_ratio is a knob of method=dora, lora, unipelt only, not of "
                                 "method=ptuning_v2: drop it, or run one of those methods"),
    ("method.init_text=hello", "method.init_text is not in method=ptuning_v2's config: add it with +method.init_text=hello"),
    ("method.optim.lr_ratoi=16", "unknown key method.optim.lr_ratoi (did you mean method.optim.lr_ratio? a knob of "
                                 "method=dora, lora, unipelt only, not of method=ptuning_v2)"),

    # a typo of this method's own knob that its yaml leaves out: that knob, with its `+`
    ("method.init_txet=hello", "unknown key method.init_txet (did you mean +method.init_text?)"),
    ("method.prefix_length=[1", "no viable alternative at input '[1'"),
])
def test_a_command_line_hydra_cannot_compose_is_one_config_error_exit_2(override, message):
    """Hydra would print several lines and exit 1; every other config mistake is one line, exit 2."""
    out = _train("--cfg", "job", override)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def _preset(tmp_path, text):  # an experiment preset outside conf/, found through hydra.searchpath
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\n" + text)
    return [f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine"]


@pytest.mark.parametrize("args,message", [
    # a sweep: Hydra names the job's override (=3); the hint must keep the user's sweep (=3,5)
    (["-m", "trainer.max_steps=3,5"], "trainer.max_steps is not in the config: add it with +trainer.max_steps=3,5"),
    # a sweep of methods: Hydra composes the sweep once with the default method (ptuning_v2), which no job runs
    (["-m", "method=lora,dora", "method.optim.lr_ratio=4"],
     "method.optim.lr_ratio: Hydra checks a sweep's overrides against the default method before the jobs of "
     "method=lora,dora run; write ++method.optim.lr_ratio=4 (it sets the key in every job)"),
    (["-m", "method=lora,ptuning_v2", "method.optim.lr_ratio=4"],
     "method.optim.lr_ratio is a knob of method=dora, lora, unipelt only, not of method=ptuning_v2 in this sweep: "
     "sweep those methods only, with ++method.optim.lr_ratio=4"),
    (["-m", "method=lora,dora", "method.optim.lr_ratoi=4"],
     "unknown key method.optim.lr_ratoi (did you mean ++method.optim.lr_ratio?)"),
    # a typo of a knob the default method has too: no ++ needed
    (["-m", "method=lora,dora", "method.optim.lrr=4"], "unknown key method.optim.lrr (did you mean method.optim.lr?)"),
    # +sweeps=methods: the sweep config's list of methods, not the default method alone
    (["-m", "+sweeps=methods", "method.optim.lr_ratio=4"],
     "method.optim.lr_ratio is a knob of method=dora, lora, unipelt only, not of method=ptuning_v2, prefix_tuning, "
     "prompt_tuning, p_tuning, adapter, ia3, bitfit, finetune in this sweep"),
    # a typo whose knob some swept methods lack: a ++ would fail their jobs (lr_ratio in ptuning_v2's)
    (["-m", "method=lora,ptuning_v2", "method.optim.lr_ratoi=4"],
     "unknown key method.optim.lr_ratoi (did you mean method.optim.lr_ratio? a knob of method=dora, lora, unipelt "
     "only, not of method=ptuning_v2 in this sweep: sweep those methods only, with ++method.optim.lr_ratio=4)"),
    (["-m", "+sweeps=methods", "method.optim.lr_ratoi=4"],
     "unknown key method.optim.lr_ratoi (did you mean method.optim.lr_ratio? a knob of method=dora, lora, unipelt "
     "only, not of method=ptuning_v2, prefix_tuning, "),
    # a sweep config of one method (its jobs run lora; the composition, ptuning_v2), and one that sets
    # hydra.mode: MULTIRUN (a multirun without -m)
    ("sweep-one", "method.optim.lr_ratio: Hydra checks a sweep's overrides against the default method before the "
                  "jobs of method=lora run; write ++method.optim.lr_ratio=4"),
    ("sweep-mode", "method.optim.lr_ratio: Hydra checks a sweep's overrides against the default method before the "
                   "jobs of method=lora,dora run; write ++method.optim.lr_ratio=4"),
    # without -m the sweep config's list runs nothing: the run's own message
    (["+sweeps=methods", "method.optim.lr_ratio=4"],
     "method.optim.lr_ratio is a knob of method=dora, lora, unipelt only, not of method=ptuning_v2: drop it"),
    # glob and choice sweeps: the methods Hydra runs (glob(*) is every method: a ++ would fail 8 of its jobs)
    (["-m", "method=glob(*)", "method.optim.lr_ratio=4"],
     "method.optim.lr_ratio is a knob of method=dora, lora, unipelt only, not of method=adapter, bitfit, finetune, "
     "ia3, p_tuning, prefix_tuning, prompt_tuning, ptuning_v2 in this sweep"),
    (["-m", "method=choice(lora,ptuning_v2)", "method.optim.lr_ratio=4"],
     "method.optim.lr_ratio is a knob of method=dora, lora, unipelt only, not of method=ptuning_v2 in this sweep"),
    (["-m", "method=lora,dora", "method.head.pooling.x=1"],
     "unknown key method.head.pooling.x; the swept methods' method.head.pooling takes no keys"),
    # a quoted value with a space: the whole value, not up to the space
    (["trainer.max_steps='a b'"], "trainer.max_steps is not in the config: add it with +trainer.max_steps='a b'"),
    # a key under an empty node (callbacks=none): what the node holds, not "callbacks has " and nothing
    (["callbacks=none", "callbacks.model_checkpoint.monitor=x"],
     "unknown key callbacks.model_checkpoint; callbacks has no keys"),
    # a list indexed by a name: OmegaConf's bare ValueError / TypeError, which Hydra does not wrap
    (["data.labels.first=x"], "cannot apply data.labels.first=x: ValueError: invalid literal for int() with base 10: "
                              "'first' (data.labels is a list: its items are data.labels.0 to data.labels.1)"),
    (["data.labels=[]", "data.labels.x.y=1"], "cannot apply data.labels.x.y=1: TypeError: Index 'x' (str) is not an "
                                               "int (data.labels is an empty list)"),
    # Hydra's own check of its flags: a ValueError with a traceback, exit 1
    (["--cfg", "job", "-m", "seed=1,2"], "Only one of --run, --multirun, --cfg, --info and --shell_completion can be "
                                         "specified (`-m --cfg job`: print one job's config without -m"),
    # a missing option that a preset sets, not the command line: say so (the user never typed model=tiny-brt)
    ("preset", "model=tiny-brt: no such model config (did you mean model=tiny-bert?); model takes "),
])
def test_a_config_error_names_what_the_command_line_says(args, message, tmp_path):
    if args == "preset":
        args = _preset(tmp_path, "defaults:\n  - override /model: tiny-brt\n")
    if args in ("sweep-one", "sweep-mode"):  # a sweep config of the user's, found through hydra.searchpath
        (tmp_path / "sweeps").mkdir()
        (tmp_path / "sweeps" / "mine.yaml").write_text(
            "# @package _global_\nhydra:\n" + ("  mode: MULTIRUN\n" if args == "sweep-mode" else "")
            + f"  sweeper:\n    params:\n      method: {'lora' if args == 'sweep-one' else 'lora,dora'}\n")
        args = [*(["-m"] if args == "sweep-one" else []), f"hydra.searchpath=[file://{tmp_path}]", "+sweeps=mine",
                "method.optim.lr_ratio=4"]
    out = _train(*args, f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and message in lines[0], out.stderr
    if "experiment=mine" in args:
        assert lines[0].endswith("(not on the command line: a preset or config file sets it)"), lines[0]
    assert not (tmp_path / "run").exists() and not list((tmp_path / "sweep").glob("*/results.json"))


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=${nope}", "data.batch_size: Interpolation key 'nope' not found"),
    ("data.batch_size=${nope:1}", "data.batch_size: Unsupported interpolation type nope"),
])
def test_an_interpolation_that_resolves_to_nothing_is_a_config_error(override, message, tmp_path):
    """Composed fine, it fails where the run first reads the key: one config error naming the key,
    exit 2, the failure in results.json (not a traceback of OmegaConf's resolver)."""
    out = _train("model=tiny-bert", override, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"config error: {message}", out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and override in results["overrides"]


@pytest.mark.parametrize("override,key,value", [
    ("experiment=smollm2_city_facts", "task_name", "smollm2_city_facts"),
    ("debug=limit", "trainer.limit_train_batches", 5),
])
def test_documented_presets_still_compose(override, key, value):
    from omegaconf import OmegaConf

    out = _train("--cfg", "job", override)
    assert out.returncode == 0, out.stderr
    assert OmegaConf.select(OmegaConf.create(out.stdout), key) == value


def test_cli_unknown_key_exits_2_before_any_model_load(tmp_path):
    """roberta-large is not in the cache here: reaching the model load would fail differently."""
    out = _train("+method.prefix_lenght=64", "model=roberta-large", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "config error: unknown key method.prefix_lenght (did you mean method.prefix_length?)" in out.stderr
    assert "Traceback" not in out.stderr


# --- values (item 15) ---------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["data.batch_size=0"], r"^data.batch_size must be a positive integer, got 0$"),
    (["data.batch_size=-8"], r"^data.batch_size must be a positive integer, got -8$"),
    (["data.batch_size=abc"], r"^data.batch_size must be a positive integer, got 'abc'$"),
    (["data.eval_batch_size=0"], r"^data.eval_batch_size must be a positive integer, got 0$"),
    (["data.eval_batch_size=2.5"], r"^data.eval_batch_size must be a positive integer, got 2.5$"),
    (["data.max_length=0"], r"^data.max_length must be a positive integer, got 0$"),
    (["data.split.train=1.0", "data.split.validation=-0.1"], r"^data.split.validation must be a fraction in \[0, 1\], got -0.1$"),
    (["data.split.train=0.7"], r"^data.split fractions must sum to 1, got \[0.7, 0.1, 0.1\]$"),
    (["+data.extra_eval={other: {files: {test: o.csv}, eval_batch_size: 0}}"],
     r"^data.extra_eval.other.eval_batch_size must be a positive integer, got 0$"),
    (["method=unipelt", "method.depth=embedding"], r"^method=unipelt gates deep prefixes: method.depth must be"),
    # the backbone's position table (its config only): MiniLM (BERT) has 512 positions
    (["data.max_length=513"], r"^data.max_length=513 is more than model=minilm can embed: its position table has 512 "
                              r"positions; set data.max_length=512 or less$"),
    # RoBERTa's positions start after pad_token_id: 66 rows, pad 1 -> 64 usable
    (["model=tiny-bert", "model.config.model_type=roberta", "model.config.max_position_embeddings=66",
      "+model.config.pad_token_id=1", "data.max_length=65"], r"^data.max_length=65 .* its position table has 64 "),
    # a decoder generates after the source (max_length // 2) up to max_new_tokens: 32 + 40 > 64
    (["model=tiny-bert", "model.config.model_type=gpt2", "model.config.max_position_embeddings=64", "data=city_facts",
      "data.max_length=64"], r"^data.generation.max_new_tokens=40 after a source of up to data.max_length // 2 = 32 "
                             r"tokens needs 72 positions; model=tiny-bert has 64$"),
])
def test_bad_values_name_the_key(overrides, message, no_weights):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg(overrides))


@pytest.mark.parametrize("overrides", [
    ["data.max_length=512"],
    ["model=tiny-bert", "model.config.model_type=roberta", "model.config.max_position_embeddings=66",
     "+model.config.pad_token_id=1", "data.max_length=64", "method=prompt_tuning"],  # the prompt takes no positions
    ["model=tiny-bert", "model.config.model_type=gpt2", "model.config.max_position_embeddings=64", "data=city_facts",
     "data.max_length=64", "data.generation.max_new_tokens=32"],
    ["model=tiny-bert", "model.config.model_type=t5", "+model.config.d_kv=8", "data.max_length=100000"],  # relative
    ["data.split.train=0.9", "data.split.validation=0.1", "data.split.test=0.0"],
])
def test_values_at_the_limit_pass(overrides, no_weights):
    validate_config(compose_cfg(overrides))


def test_position_limits_per_architecture():
    from transformers import BartConfig, BertConfig, DebertaV2Config, GPT2Config, LlamaConfig, RobertaConfig, T5Config

    from peft_lightning.validation import position_limit

    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # roberta-base
    assert position_limit(GPT2Config(n_positions=1024)) == 1024
    assert position_limit(BartConfig(max_position_embeddings=1024)) == 1024
    assert position_limit(LlamaConfig(max_position_embeddings=8192)) == 8192
    assert position_limit(T5Config()) is None
    assert position_limit(DebertaV2Config(position_biased_input=False)) is None  # deberta-v3


def test_gpu_trainer_without_gpu_names_trainer_accelerator(monkeypatch, no_weights):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^trainer.accelerator=gpu but no CUDA GPU is visible here"):
        validate_config(compose_cfg(["trainer=gpu"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^trainer.devices=4 but 1 CUDA GPU\(s\) are visible here$"):
        validate_config(compose_cfg(["trainer=gpu", "trainer.devices=4"]))
    validate_config(compose_cfg(["trainer=gpu"]))


def test_absurd_prefix_length_warns(caplog, no_weights):
    """MiniLM has 22.7M parameters; 10,000 deep virtual tokens are 6 layers x 2 x 384 x 10,000 = 46M."""
    with caplog.at_level(logging.WARNING, logger="peft_lightning.validation"):
        validate_config(compose_cfg(["method.prefix_length=16"]))
        assert not caplog.records
        validate_config(compose_cfg(["method.prefix_length=10000"]))
    assert [r.getMessage() for r in caplog.records] == [
        "method.prefix_length=10000: the prompt alone has 46,080,000 parameters, 67% of the model (22,713,216 in "
        "model=minilm); a prompt this long trains more than the model it adapts"]


# --- the sweeper's objective (item 11) -----------------------------------------------------------
def test_objective_is_the_configured_selection_metric():
    from peft_lightning.multirun import objective

    best = {"val/f1_best": 0.71}
    assert objective(best, {"task": "classification", "metric": "f1"}) == 0.71
    assert objective({"val/pearson_best": 0.52}, {"task": "regression", "metric": None}) == 0.52  # the task's default
    assert objective({"val/bleu_best": 31.0}, {"task": "generation", "metric": "bleu"}) == 31.0
    assert objective(best) == 0.71  # a DDP job's results.json, read back by its multirun parent


@pytest.mark.slow  # a real (tiny) Optuna trial: ~30 s
def test_optuna_gets_a_number_for_a_regression_task(tmp_path):
    """data.metric=pearson: train.py used to return val/acc_best (None), and the trial failed."""
    out = _train("-m", "+sweeps=optuna", "hydra.sweeper.n_trials=1", "model=tiny-bert", "data=rotten_tomatoes_scores",
                 "data.max_length=32", "data.batch_size=8", "logger=csv", "callbacks=none", "test=false",
                 "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
                 f"hydra.sweep.dir={tmp_path}", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert isinstance(result["best_value"], float) and -1 <= result["best_value"] <= 1


@pytest.mark.parametrize("overrides,message", [
    (["seed=-1"], r"seed must be a non-negative integer, got -1"),
    (["data.split.seed=1.5"], r"data.split.seed must be a non-negative integer, got 1.5"),
    (["data.labels=[neg,pos,pos]"], r"data.labels names \['pos'\] more than once"),
])
def test_seeds_and_label_names_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg(overrides))


def test_hub_only_keys_with_another_source_are_named_in_the_log(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        validate_config(compose_cfg(["data=rte", "data.source=local.jsonl"]))
    assert "data.subset, data.splits, data.dev_from_train apply to hub: sources only" in caplog.text
