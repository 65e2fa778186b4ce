"""Loud failures when transformers is outside the tested range or its internals changed (peft_lightning/compat.py)."""
import inspect
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ARCHS, tiny_model
from packaging.requirements import Requirement
from packaging.version import Version

from peft_lightning import compat
from peft_lightning.backbone import BackboneSpec, load_backbone
from peft_lightning.injection import prefix
from peft_lightning.errors import UserError
from peft_lightning.injection.architectures import attention_slots
from peft_lightning.injection.prefix import install_prefix_attention

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_requirement_is_the_tested_range():
    text = (ROOT / "pyproject.toml").read_text()
    req = Requirement(re.search(r'"(transformers[^"]*)"', text).group(1))
    low, high = compat.TESTED_TRANSFORMERS
    lower = [s.version for s in req.specifier if s.operator == ">="]
    assert lower == [low], f"pyproject.toml's transformers lower bound {lower} != compat.TESTED_TRANSFORMERS {low}"
    assert Version(high) in req.specifier  # the newest tested release is installable
    assert Version(transformers.__version__) in req.specifier


def _pins(end: str) -> dict[str, str]:
    lines = (ROOT / ".ci" / f"compat-{end}.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_compat_job_pins_are_the_ends_of_pyprojects_ranges():
    """.ci/compat runs the suite with the oldest and the newest releases pyproject.toml admits: each
    oldest pin is a lower bound there, each newest pin is admitted, and transformers' ends are
    compat.TESTED_TRANSFORMERS."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("\ndependencies = [", 1)[1].split("\n]", 1)[0]
    requirements = {r.name: r for r in map(Requirement, re.findall(r'^    "([^"]+)",', block, re.M))}
    oldest, newest = _pins("oldest"), _pins("newest")
    assert oldest.keys() == newest.keys() and {"torch", "transformers", "lightning"} <= oldest.keys()
    for name in oldest:
        spec = requirements[name].specifier
        lower = [Version(s.version) for s in spec if s.operator == ">="]
        assert lower == [Version(oldest[name])], f"{name}: pyproject lower bound {lower} != oldest pin {oldest[name]}"
        assert Version(newest[name]) in spec, f"{name}: newest pin {newest[name]} is outside pyproject's {spec}"
    low, high = compat.TESTED_TRANSFORMERS
    assert Version(oldest["transformers"]) == Version(low)
    assert Version(newest["transformers"]).release[:2] == Version(high).release[:2]


def test_older_transformers_is_refused_with_the_pin(monkeypatch):
    # (the module object compat reads: importing some transformers submodules replaces sys.modules' entry)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ImportError) as err:  # an ImportError, and a UserError the entry points print in one line
        compat.check_transformers()
    assert isinstance(err.value, UserError)
    low, high = compat.TESTED_TRANSFORMERS
    assert "installed 4.57.1" in str(err.value)
    after = Version(high)  # every patch release of the newest tested one, as pyproject admits
    assert f'pip install "transformers>={low},<{after.major}.{after.minor + 1}"' in str(err.value)


def test_newer_transformers_warns_and_tested_patch_release_does_not(monkeypatch):
    high = Version(compat.TESTED_TRANSFORMERS[1])
    monkeypatch.setattr(sys.modules["transformers"], "__version__", f"{high.major}.{high.minor + 1}.0")
    with pytest.warns(UserWarning, match=r"newer than any release .*pip install"):
        compat.check_transformers_version()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_transformers_version(f"{high.major}.{high.minor}.7")
        compat.check_transformers_version(compat.TESTED_TRANSFORMERS[0])


def test_import_of_the_injection_machinery_refuses_old_transformers():
    code = "import transformers; transformers.__version__ = '4.40.0'; import peft_lightning.injection.prefix"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    # (the class and the message on one line, or on two where an installed library (datasets 3.0) sets a
    # rich excepthook)
    tail = " ".join(run.stderr.strip().splitlines()[-2:])
    assert "peft_lightning.errors.IncompatibleVersion:" in tail, tail
    assert "peft-lightning needs a newer transformers: installed 4.40.0" in tail, tail


def test_train_py_with_an_untested_transformers_exits_2_with_one_line(tmp_path):
    code = ("import sys, runpy, transformers; transformers.__version__ = '5.19.0'; "
            f"sys.argv = ['train.py', 'model=tiny-bert', 'hydra.run.dir={tmp_path}']; "
            "runpy.run_path('train.py', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: peft-lightning needs a newer transformers: "
                                                          "installed 5.19.0")


def test_older_lightning_is_refused_with_the_pin():
    with pytest.raises(ImportError, match=r"needs lightning>=2\.6 .*installed 2\.5\.0: pip install"):
        compat.check_lightning("2.5.0")
    compat.check_lightning("2.6.0")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bart"])
def test_a_decoder_attention_without_its_causal_flag_fails_at_build(arch):
    """The prefix kernels keep the causal mask by reading the attention module's is_causal; a release
    that drops it would let tokens see later ones with a prefix on, which the output self-check misses."""
    model = load_backbone(BackboneSpec(**tiny_model(arch)))
    for _, module in attention_slots(model):
        if _.role == "decoder":
            del module.is_causal
    with pytest.raises(ImportError, match=r"no longer has is_causal=True"):
        install_prefix_attention(model)


def test_changed_sdpa_kernel_signature_names_the_symbol(monkeypatch):
    import transformers.integrations.sdpa_attention as sa

    def changed(module, q, k, v, mask, **kwargs):  # parameters renamed
        return None

    monkeypatch.setattr(sa, "sdpa_attention_forward", changed)
    with pytest.raises(ImportError, match=r"sdpa_attention_forward.*expected parameters "
                                          r"\(module, query, key, value, attention_mask; accepting is_causal\), "
                                          r"found \(module, q, k, v, mask, kwargs\)"):
        compat.check_transformers()


def test_changed_mask_function_signature_names_the_symbol(monkeypatch):
    import transformers.masking_utils as mu

    def changed(batch, q_len, kv_len, **kwargs):
        return None

    monkeypatch.setattr(mu, "sdpa_mask", changed)
    with pytest.raises(ImportError, match=r"masking_utils\.sdpa_mask.*\(batch_size, q_length, kv_length"):
        compat.check_transformers()


def test_stock_mask_no_longer_the_one_we_alias(monkeypatch):
    import transformers.masking_utils as mu

    monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", mu.eager_mask)
    with pytest.raises(ImportError, match=r"no longer builds 'sdpa' masks"):
        compat.check_transformers()


def test_changed_eager_kernel_fails_at_build(monkeypatch):
    import transformers.models.bert.modeling_bert as mb

    def changed(module, query, key, value, attention_mask, *, scale, **kwargs):  # 'scaling' renamed, no **kw pass
        return None

    sig = inspect.signature(changed)
    changed.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD])
    monkeypatch.setattr(mb, "eager_attention_forward", changed)
    model = load_backbone(BackboneSpec(**tiny_model("bert", "eager")))
    with pytest.raises(ImportError, match=r"modeling_bert\.eager_attention_forward.*accepting scaling, dropout"):
        install_prefix_attention(model)


def test_changed_deberta_attention_forward_fails_at_build(monkeypatch):
    import transformers.models.deberta_v2.modeling_deberta_v2 as md

    original = md.DisentangledSelfAttention.forward

    def changed(self, hidden_states, attention_mask, query_states=None, relative_pos=None, rel_embeddings=None):
        return original(self, hidden_states, attention_mask, False, query_states, relative_pos, rel_embeddings)

    monkeypatch.setattr(md.DisentangledSelfAttention, "forward", changed)
    model = load_backbone(BackboneSpec(**tiny_model("deberta-v2")))
    with pytest.raises(ImportError, match=r"DisentangledSelfAttention\.forward.*expected parameters \(self, "
                                          r"hidden_states, attention_mask, output_attentions"):
        install_prefix_attention(model)


def _noop_with_prefix(module, query, key, value, attention_mask, kwargs, additive):
    kwargs.pop(prefix.PREFIX_KWARG, None)  # a changed internal that drops the prefix on the floor
    return key, value, attention_mask


def _noop_deberta(self, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_self_check_catches_a_prefix_that_never_reaches_attention(arch, monkeypatch):
    model = load_backbone(BackboneSpec(**tiny_model(arch)))
    monkeypatch.setattr(prefix, "_with_prefix", _noop_with_prefix)
    monkeypatch.setitem(prefix.PATCHED_FORWARDS, "deberta-v2", _noop_deberta)
    with pytest.raises(RuntimeError, match=r"prefix mechanism is not reaching attention in transformers .*"
                                           r"pip install \"transformers>="):
        install_prefix_attention(model)


@pytest.mark.parametrize("arch,attn", [(a, i) for a in ARCHS for i in ("sdpa", "eager") if a != "deberta-v2"]
                         + [("deberta-v2", None)])  # (DeBERTa has its own attention, no SDPA)
def test_self_check_passes_and_leaves_the_model_as_it_was(arch, attn):
    model = load_backbone(BackboneSpec(**tiny_model(arch, attn))).train()
    install_prefix_attention(model)
    assert model.training and all(m.training for m in model.modules())
    assert all(getattr(m, prefix.STATE_ATTR, None) is None for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules() if m is not model)  # the capture hook is gone
    ids = torch.tensor([[5, 6, 7]])
    kw = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    model(input_ids=ids, **kw)  # and it still runs
