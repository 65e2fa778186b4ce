"""benchmarks/speed.py's measuring helpers on tiny models (issue 15): dropout modes, attention
kernels, FLOP counts, saved bytes, the memory peak and the twins' trainable counts, each against
a hand count. Nothing here is timed."""
import pytest
import torch
from torch import nn

from benchmarks import speed as S
from tests.conftest import TINY

H, L, F, P, C = 32, 3, 37, 16, 2  # tiny BERT: hidden, layers, FFN width; prefix length; classes
HEAD = H * C + C
# (peft's prefix shifts the positions by P: room for P + the batch's 12 tokens)
SPEC = {"config": dict(TINY["bert"], hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                       max_position_embeddings=32)}
DROPOUTS = 1 + 3 * L  # embeddings; per layer attention probabilities, attention output, FFN output


def batch():
    return S.make_batch(TINY["bert"]["vocab_size"], 3, 12)


def step_of(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    b = batch()
    return lambda: S.train_step(model, opt, b)


@pytest.mark.parametrize("pair", [("deep prefix (ptuning_v2)", "peft prefix"), ("LoRA r=8", "peft LoRA"),
                                  ("deep prefix + checkpointing", "floor + checkpointing")])
def test_modes_match_dropouts_and_attention_kernel(pair):
    models = [S.build(name, SPEC) for name in pair]
    for dropout in (False, True):
        kernels = []
        for m in models:
            S.set_mode(m, dropout)
            assert S.active_dropouts(m) == (DROPOUTS if dropout else 0)
            attention = [a for a in m.modules() if type(a).__name__ == "BertSelfAttention"]
            assert len(attention) == L and all(a.training == dropout for a in attention)
            kernels.append(S.measure_work(step_of(m), m)["attention"])
        # dropout on hands p > 0 to SDPA, which leaves the CPU flash kernel for the math path;
        # checkpointed layers run their attention again in backward
        calls = 2 * L if "checkpointing" in pair[0] else L
        assert kernels == [f"math x{calls}" if dropout else f"flash (CPU) x{calls}"] * 2


def test_flops_equal_flopcountermode_on_a_train_step():
    from torch.utils.flop_counter import FlopCounterMode

    m = S.build("deep prefix (ptuning_v2)", SPEC)
    S.set_mode(m, False)
    step = step_of(m)
    with FlopCounterMode(display=False) as reference:
        step()
    assert S.measure_work(step, m)["flops"] == reference.get_total_flops() > 0


def test_checkpointing_stays_on_with_the_backbone_in_eval_mode():
    m = S.build("floor + checkpointing", SPEC)
    S.set_mode(m, False)
    layers = [x for x in m.modules() if type(x).__name__ == "BertLayer"]
    # transformers recomputes a layer only while the layer is in training mode; its dropouts stay off
    assert len(layers) == L and all(x.gradient_checkpointing and x.training for x in layers)
    assert S.active_dropouts(m) == 0


@pytest.mark.parametrize("input_grad", [False, True])
def test_flops_of_a_linear_step(input_grad):
    m, k, n = 5, 7, 3
    lin = nn.Linear(k, n)
    x = torch.randn(m, k, requires_grad=input_grad)
    work = S.measure_work(lambda: lin(x).sum().backward(), lin)
    # forward x W^T; backward: grad W = g^T x, and grad x = g W when x needs it (bias sums: no matmul)
    assert work["flops"] == 2 * m * k * n * (3 if input_grad else 2)
    # autograd keeps x for grad W (the weight is a parameter: not counted)
    assert work["saved_bytes"] == (m * k * 4)


def test_attention_flops_on_flash_and_math_kernels():
    b, h, s, d = 2, 3, 8, 4
    flops = {}
    for p in (0.0, 0.5):
        q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))

        def step(q=q, k=k, v=v, p=p):
            nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p).sum().backward()

        work = S.measure_work(step)
        flops[p] = work["flops"]
        assert work["attention"] == ("flash (CPU) x1" if p == 0 else "math x1")
    # (s x d x s) matmuls per head: forward Q K^T and A V; backward dV, dA, dQ, dK, and the flash
    # kernel recomputes Q K^T from the saved log-sum-exp (torch counts the CUDA flash kernels so)
    unit = 2 * b * h * s * s * d
    assert (flops[0.0], flops[0.5]) == (7 * unit, 6 * unit)


def test_lstm_flops():
    B, T, i, h = 2, 5, 6, 4
    lstm = nn.LSTM(i, h, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(B, T, i, requires_grad=True)
    work = S.measure_work(lambda: lstm(x)[0].sum().backward(), lstm)
    forward = 2 * 2 * B * T * 4 * h * ((i + h) + (2 * h + h))  # 2 directions x 2 FLOPs x rows x gates x (in + h)
    assert work["flops"] == 3 * forward  # backward: inputs' and weights' gradients


def test_peak_catches_a_short_lived_allocation():
    big = 8 * 2**20  # floats: 32 MiB
    keep = torch.ones(big)  # allocated before the step: not part of its peak

    def step(spike):
        y = torch.ones(1000) * 2
        if spike:
            x = torch.ones(big) * 3  # the product lives for one line: 2 x 32 MiB at the peak
            y += x[:1000]
            del x
        return y

    assert S.peak_bytes(lambda: step(True)) >= 2 * big * 4
    assert S.peak_bytes(lambda: step(False)) < 2**20
    assert keep.numel() == big


def lstm_params(i, h):  # one biLSTM layer: 2 directions x (4h x i + 4h x h + two 4h biases)
    return 2 * (4 * h * i + 4 * h * h + 8 * h)


TRAINABLE = {  # ours, peft twin (hand formulas), without the head
    ("deep prefix (ptuning_v2)", "peft prefix"): (P * L * 2 * H,) * 2,
    ("prefix + MLP 512 (prefix_tuning)", "peft prefix + MLP"): (P * H + H * 512 + 512 + 512 * L * 2 * H + L * 2 * H,)
    * 2,
    ("prompt tuning", "peft prompt tuning"): (P * H,) * 2,
    ("P-tuning LSTM 256", "peft P-tuning LSTM"): (P * H + lstm_params(H, 128) + lstm_params(256, 128)
                                                  + 256 * 256 + 256 + 256 * H + H,) * 2,
    # peft's MLP has a second hidden layer (256 x 256 + 256)
    ("P-tuning MLP 256", "peft P-tuning MLP"): (P * H + H * 256 + 256 + 256 * H + H,
                                                P * H + H * 256 + 256 + 256 * 256 + 256 + 256 * H + H),
    ("LoRA r=8", "peft LoRA"): (L * 2 * 8 * (H + H),) * 2,
    ("DoRA r=8", "peft DoRA"): (L * 2 * (8 * (H + H) + H),) * 2,
    ("(IA)^3", "peft IA3"): (L * (2 * H + F),) * 2,
}


@pytest.mark.parametrize("pair", list(TRAINABLE), ids=lambda p: p[0])
def test_twins_trainable_counts(pair):
    assert S.OURS[pair[0]][2] == pair[1]
    for name, expected in zip(pair, TRAINABLE[pair]):
        m = S.build(name, SPEC)
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expected + HEAD, name


def test_verdicts_call_differences_inside_the_run_to_run_noise_parity():
    """Two quiet runs agreed on medians to 0.02 but not on verdicts below that: a 0.3% difference with a
    tight IQR is parity, not 'slower'; a 7% one is a verdict; a target is 'not met' only beyond the noise."""
    from benchmarks.speed import NOISE, verdict
    assert NOISE == 0.02
    assert verdict((1.003, 1.001, 1.008)) == "parity (inside noise)"    # IQR above 1.0, inside the noise
    assert verdict((0.985, 0.975, 0.995)) == "parity (inside noise)"
    assert verdict((0.93, 0.92, 0.94)) == "faster" and verdict((1.07, 1.05, 1.09)) == "slower"
    assert verdict((1.03, 0.99, 1.05)) == "parity (inside noise)"      # IQR spans 1.0


SCRIPTS = [
    ["speed.py", "--smoke", "--suite", "core", "--modes", "off", "--no-eval", "--compile", "--pipeline-examples", "0"],
    ["speedups.py", "--smoke"], ["frozen_cache.py", "--smoke"], ["profile_step.py", "--smoke", "--configs", "floor"],
    ["mixed_tasks.py", "--smoke"],
]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s[0])
def test_benchmark_scripts_run_in_smoke_mode(script):
    """Every script all.sh runs still runs (its smoke mode: tiny shapes, the code path only), and
    prints a table or the profile; a benchmark that rots fails here, not in the next quiet run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / script[0]), *script[1:]], cwd=root,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "|---|" in out.stdout or "calls/step" in out.stdout, out.stdout[-2000:]
