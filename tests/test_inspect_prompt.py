"""Nearest vocabulary tokens of learned virtual tokens."""
import subprocess
import sys

import torch
from conftest import make_batch, tiny_model

from peft_lightning.checkpoint import save_pretrained
from peft_lightning.inspect_prompt import nearest_tokens
from peft_lightning.methods import METHODS
from test_reliability import ROOT


def prompt_module(**method):
    spec = tiny_model("bert")
    spec["config"]["vocab_size"] = 30522  # the embedded tokenizer's
    spec["tokenizer"] = "embedded:minilm"
    cfg = dict(name="prompt_tuning", prefix_length=3, depth="embedding", reparameterization="none", init="text",
               init_text="great terrible movie")
    cfg.update(method)
    return METHODS[cfg["name"]](model=spec, method=cfg, num_labels=2)



def test_a_prompt_initialised_from_words_is_nearest_to_those_words():
    m = prompt_module()
    from peft_lightning.backbone import BackboneSpec, load_tokenizer

    rows = nearest_tokens(m, load_tokenizer(BackboneSpec(tokenizer="embedded:minilm")), top=3)
    assert [row[0][0] for row in rows] == ["great", "terrible", "movie"]
    assert all(abs(row[0][1] - 1) < 1e-5 for row in rows)  # cosine 1 with itself
    assert rows[0][1][1] < rows[0][0][1]


def test_cli_prints_each_virtual_token(tmp_path):
    m = prompt_module()
    m(make_batch())  # runs
    save_pretrained(m, tmp_path / "a")
    out = subprocess.run([sys.executable, "-m", "peft_lightning.inspect_prompt", str(tmp_path / "a"), "--top", "2"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0].startswith("virtual token   0: great (1.00)")
    plain = prompt_module(name="ptuning_v2", depth="deep", init="random")
    torch.manual_seed(0)
    save_pretrained(plain, tmp_path / "b")
    out = subprocess.run([sys.executable, "-m", "peft_lightning.inspect_prompt", str(tmp_path / "b")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "keys/values, not embeddings" in out.stderr
