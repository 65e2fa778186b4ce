"""Damaged adapter directories fail with an AdapterError naming the file and key, never load
half-way; the CLIs that read adapters (predict, export, inspect_prompt) say so in one line, exit 2."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_batch, tiny_model

from peft_lightning.checkpoint import BACKBONE, CONFIG, WEIGHTS, load_pretrained, save_pretrained
from peft_lightning.errors import AdapterError
from peft_lightning.methods import METHODS

BAD = Path(__file__).parent / "data" / "bad"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny ptuning_v2 adapter on a random (config-built) BERT: its backbone travels with it."""
    torch.manual_seed(0)
    spec = tiny_model("bert")
    spec["config"]["vocab_size"] = 30522  # the embedded tokenizer's, for the CLIs
    spec["tokenizer"] = "embedded:minilm"
    method = dict(name="ptuning_v2", prefix_length=3, depth="deep", reparameterization="mlp", reparam_hidden=8,
                  head={"dropout": 0.0})
    m = METHODS["ptuning_v2"](model=spec, method=method, num_labels=2, labels=["neg", "pos"])
    return save_pretrained(m, tmp_path_factory.mktemp("good") / "adapter"), m


def damaged(adapter, tmp_path, edit=None, remove=None, truncate=None, replace=None):
    folder = shutil.copytree(adapter, tmp_path / "adapter")
    if remove:
        (folder / remove).unlink()
    if truncate:
        data = (folder / truncate).read_bytes()
        (folder / truncate).write_bytes(data[: len(data) // 2])
    if replace:
        shutil.copy(BAD / replace, folder / CONFIG)
    if edit:
        config = json.loads((folder / CONFIG).read_text())
        edit(config)
        (folder / CONFIG).write_text(json.dumps(config))
    return folder


def _set(path, value):
    def edit(config):
        *parents, last = path.split(".")
        for key in parents:
            config = config[key]
        config[last] = value
    return edit


CASES = {
    "backbone missing": (dict(remove=BACKBONE), rf"{BACKBONE} not found: model.config in .*{CONFIG} builds a randomly"),
    "config missing": (dict(remove=CONFIG), rf"{CONFIG} not found: not a peft-lightning adapter directory"),
    "weights missing": (dict(remove=WEIGHTS), rf"{WEIGHTS} not found"),
    "broken json": (dict(replace="adapter_config_truncated.json"), rf"{CONFIG} is not valid JSON \(Expecting"),
    "no method": (dict(edit=lambda c: c.pop("method")), rf"{CONFIG}: missing key\(s\) \['method'\]"),
    "no method name": (dict(edit=lambda c: c["method"].pop("name")), rf"{CONFIG}: key 'method.name' is missing"),
    "unknown method": (dict(edit=_set("method.name", "magic")), rf"{CONFIG}: method.name='magic' is not a method"),
    "unknown key": (dict(edit=_set("prefix_lenght", 4)), rf"{CONFIG}: unknown key\(s\) \['prefix_lenght'\]"),
    "unknown method key": (dict(edit=_set("method.prefix_lenght", 4)),
                           rf"{CONFIG}: unknown key method.prefix_lenght \(did you mean method.prefix_length\?\)"),
    "unknown model key": (dict(edit=_set("model.revision", "main")), r"unknown key\(s\) \['model.revision'\]"),
    "another model": (dict(edit=_set("model.config.hidden_size", 48)),
                      rf"{WEIGHTS}: tensor '.*' has shape .* but the settings of .*{CONFIG} \(.*model.config.hidden_size"
                      r"=48.*\) build .*; the adapter config's model, method or task settings differ"),
    "another prefix length": (dict(edit=_set("method.prefix_length", 8)),
                              rf"{WEIGHTS}: tensor '.*' has shape .* but the settings of .*{CONFIG} \(.*"
                              r"method.prefix_length=8.*task=classification.*\) build .*model, method or task"),
    "unknown tokenizer": (dict(edit=_set("model.tokenizer", "embedded:nope")),
                          rf"{CONFIG}: key 'model.tokenizer': Unknown embedded model 'nope'"),
    "tokenizer bigger than the embedding": (
        dict(edit=_set("model.config.vocab_size", 99)),
        rf"{CONFIG}: key 'model.tokenizer': model.tokenizer='embedded:minilm': the tokenizer has 30,522 tokens but "
        r"the backbone's input embedding has 99 rows"),
    "bad method value": (dict(edit=_set("method.reparameterization", "gru")),
                         rf"{CONFIG}: ValueError: reparameterization must be one of"),
    "truncated weights": (dict(truncate=WEIGHTS), rf"{WEIGHTS} is truncated or corrupt"),
    "truncated backbone": (dict(truncate=BACKBONE), rf"{BACKBONE} is truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_adapter_is_an_adapter_error_naming_file_and_key(adapter, tmp_path, case):
    damage, message = CASES[case]
    folder = damaged(adapter[0], tmp_path, **damage)
    with pytest.raises(AdapterError, match=message) as info:
        load_pretrained(folder)
    assert "\n" not in str(info.value)


def test_the_intact_adapter_loads_and_answers_as_saved(adapter):
    folder, m = adapter
    batch = make_batch(length=8)
    batch["input_ids"] = batch["input_ids"] + 1000  # (the 30522-word vocabulary)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(folder)(batch), m.eval()(batch), atol=0, rtol=0)


@pytest.mark.parametrize("cli", ["predict", "export", "inspect_prompt"])
@pytest.mark.parametrize("case", ["backbone missing", "broken json", "another model"])
def test_clis_print_one_line_and_exit_2(adapter, tmp_path, capsys, monkeypatch, cli, case):
    import importlib
    import io

    damage, message = CASES[case]
    folder = damaged(adapter[0], tmp_path, **damage)
    main = importlib.import_module(f"peft_lightning.{cli}").main
    monkeypatch.setattr("sys.stdin", io.StringIO("a fine film\n"))
    assert main([str(folder), *([str(tmp_path / "out")] if cli == "export" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err


def test_a_misspelt_knob_in_python_is_refused_and_other_methods_knobs_are_not_saved(tmp_path):
    """Built in Python (no Hydra schema): a key no method reads is a typo and an error; knobs of
    other methods (a shared dict of knobs) are tolerated but not written into the adapter, whose
    config is read back strictly."""
    from peft_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown key method.prefix_lenght \(did you mean method.prefix_length\?\)"):
        METHODS["ptuning_v2"](model=tiny_model("bert"), method=dict(name="ptuning_v2", prefix_lenght=3), num_labels=2)
    m = METHODS["lora"](model=tiny_model("bert"), method=dict(name="lora", r=2, prefix_length=3, bottleneck=4),
                        num_labels=2)
    folder = save_pretrained(m, tmp_path / "adapter")
    saved = json.loads((folder / CONFIG).read_text())["method"]
    assert saved["r"] == 2 and "prefix_length" not in saved and "bottleneck" not in saved
    batch = make_batch(length=8)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(folder)(batch), m.eval()(batch), atol=0, rtol=0)


def test_a_tokenizer_bigger_than_the_embedding_is_refused(tmp_path):
    """The one check predict (load_pretrained) and training (run.build) share."""
    from omegaconf import OmegaConf

    from peft_lightning.backbone import BackboneSpec, check_tokenizer_fits, load_backbone, load_tokenizer
    from peft_lightning.errors import ConfigError
    from peft_lightning.run import build

    tokenizer = load_tokenizer(BackboneSpec(tokenizer="embedded:minilm"))
    small = load_backbone(BackboneSpec(**tiny_model("bert")))  # 99 rows
    with pytest.raises(ValueError, match=r"^here: the tokenizer has 30,522 tokens but the backbone's input "
                                         r"embedding has 99 rows"):
        check_tokenizer_fits(tokenizer, small, "here")
    spec = tiny_model("bert")
    spec["config"]["vocab_size"] = 30522
    check_tokenizer_fits(tokenizer, load_backbone(BackboneSpec(**spec)), "here")  # its own size fits
    cfg = OmegaConf.create({"model": {**tiny_model("bert"), "tokenizer": "embedded:minilm"}, "seed": 0,
                            "method": {"name": "lora"}, "paths": {"cache_dir": str(tmp_path)},
                            "data": {"source": "embedded:sms_spam", "labels": ["ham", "spam"]}})
    with pytest.raises(ConfigError, match=r"^model.tokenizer='embedded:minilm': the tokenizer has 30,522 tokens"):
        build(cfg)
