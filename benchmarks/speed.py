"""Train and evaluation step time of every method against its HF peft twin and the frozen-backbone
floor, with the work behind every ratio; and the data pipeline's epoch against padding to 128.

    python benchmarks/speed.py                                  # MiniLM (embedded), batch 32 x 64, all configs
    python benchmarks/speed.py --backbone roberta-base-shaped --batch 16 --suite core --modes off --no-eval
    python benchmarks/speed.py --smoke --markdown /tmp/s.md     # every code path on tiny shapes, 2 rounds
    bash benchmarks/all.sh                                      # everything -> docs/benchmarks_results.md

How it keeps comparisons fair (issue 15):
- One dropout mode per comparison. Every train step runs with the backbone's dropout "off" (every
  backbone in eval mode: ours with backbone_dropout false, the floor's and peft's backbones .eval())
  or "on" (every backbone in train mode: ours with backbone_dropout true), the same on both sides,
  and both modes are reported. The mode is not cosmetic: in train mode BERT hands its dropout rate
  to the attention kernel, which moves CPU SDPA from the flash kernel to the math kernel. Each row
  prints its active dropout modules (nn.Dropout in training mode with p > 0, whole model) and the
  attention kernel its step dispatched (the aten ops seen by a TorchDispatchMode: the fused SDPA
  kernels by name; none of them but softmax ops = the unfused math path). Method-level dropouts
  (prefix, LoRA, head) are 0 on both sides, so twins compare the same network.
- True twins: the same prefix length (P = 16), head (ours, linear on the first real token, no
  dropout) and loss (cross entropy) on both sides. P-tuning LSTM: our reparam_hidden 256 is peft's
  encoder_hidden_size 128 per direction (the same biLSTM and MLP); P-tuning MLP: the same width,
  but peft's MLP has one more hidden layer (the trainable counts show it); (IA)^3 on keys, values
  and the feed-forward input on both sides (peft's default would also scale the attention output).
  BitFit, fine-tuning and the adapter have no peft twin; they run in both modes too, and the mode
  their conf/method yaml picks is marked.
- Statistics. Every (config, mode) is timed once per round, in an order shuffled each round
  (seeded); medians and IQRs over rounds; ratios are paired per round (a config and its reference
  timed in the same round), and a ratio whose IQR spans 1.0, or whose median is within NOISE (2%) of
  it, is reported as parity (inside the noise).
- Work beside every ratio: FLOPs of one step, by torch.utils.flop_counter's formulas as
  FlopCounterMode counts them (matmuls and attention; elementwise ops are not counted). torch has
  no formula for the CPU flash-attention and oneDNN LSTM kernels (they would count 0), so theirs
  are registered below: flash as torch counts its CUDA flash kernels, whose backward recomputes
  Q K^T (7 L x d x L matmuls per head against the math kernel's 6). Bytes autograd saves for
  backward (unique storages, parameters and buffers excluded; inside activation-checkpointed layers
  nothing is saved: the layer inputs a checkpoint keeps show in the peak). Achieved FLOP/s as a
  share of this machine's dense fp32 matmul peak (2048^3 matmuls, best of 3, timed in every round
  among the configs, same threads).
- Memory: after a warm-up step, the peak of the allocator's running total during one step above
  its level at the step's start (gradients are released at the end of every step). CPU: every
  allocation and free event of torch.profiler(profile_memory=True), so no peak is missed; CUDA:
  max_memory_allocated after reset_peak_memory_stats.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft_lightning.methods import METHODS, PeftClassifier  # noqa: E402
from peft_lightning.tasks.heads import ClassificationHead  # noqa: E402

ROBERTA_BASE = dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514, pad_token_id=1)
TINY_ROBERTA = dict(ROBERTA_BASE, vocab_size=5000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128)  # --smoke: the same code paths in seconds
BACKBONES = {"minilm": {"name_or_path": "embedded:minilm"}, "roberta-base-shaped": {"config": ROBERTA_BASE}}
P = 16
MODES = {"off": False, "on": True}  # backbone dropout

FLOORS = {"floor": False, "floor + checkpointing": True}  # name: activation checkpointing
OURS = {  # label: (method, knobs over conf/method/<method>.yaml, peft twin or None)
    "deep prefix (ptuning_v2)": ("ptuning_v2", dict(prefix_dropout=0.0), "peft prefix"),
    "deep prefix + checkpointing": ("ptuning_v2", dict(prefix_dropout=0.0, activation_checkpointing=True),
                                    "peft prefix"),
    "deep prefix + recompute attention": ("ptuning_v2", dict(prefix_dropout=0.0, recompute_attention=True),
                                          "peft prefix"),  # selective checkpointing: the attention core only
    "prefix + MLP 512 (prefix_tuning)": ("prefix_tuning", dict(reparam_hidden=512), "peft prefix + MLP"),
    "prompt tuning": ("prompt_tuning", dict(init="random"), "peft prompt tuning"),
    "P-tuning LSTM 256": ("p_tuning", dict(reparameterization="lstm", reparam_hidden=256), "peft P-tuning LSTM"),
    "P-tuning MLP 256": ("p_tuning", dict(reparameterization="mlp", reparam_hidden=256), "peft P-tuning MLP"),
    "LoRA r=8": ("lora", dict(r=8, alpha=16, dropout=0.0), "peft LoRA"),
    "DoRA r=8": ("dora", dict(r=8, alpha=16, dropout=0.0), "peft DoRA"),
    "(IA)^3": ("ia3", {}, "peft IA3"),
    "adapter (houlsby 64)": ("adapter", dict(bottleneck=64), None),
    "BitFit": ("bitfit", {}, None),
    "fine-tuning": ("finetune", {}, None),
}
TWINS = ("peft prefix", "peft prefix + MLP", "peft prompt tuning", "peft P-tuning LSTM", "peft P-tuning MLP",
         "peft LoRA", "peft DoRA", "peft IA3")
SUITES = {"all": [*FLOORS, *OURS, *TWINS],
          "core": ["floor", "floor + checkpointing", "deep prefix (ptuning_v2)", "deep prefix + checkpointing",
                   "deep prefix + recompute attention", "peft prefix", "LoRA r=8", "peft LoRA"]}


# --- the configs ------------------------------------------------------------------------------

def method_config(method: str, **knobs) -> dict:
    """conf/method/<method>.yaml with `knobs` over it, and the head without dropout (the twins' head)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "conf" / "method" / f"{method}.yaml").read_text())
    cfg.update(knobs)
    cfg["head"] = {**cfg.get("head", {}), "dropout": 0.0}
    return cfg


def ours(method: str, knobs: dict, model: dict) -> PeftClassifier:
    cfg = method_config(method, **knobs)
    if "prefix_length" in cfg:
        cfg["prefix_length"] = P
    return METHODS[method](model=model, method=cfg, num_labels=2)


class Floor(PeftClassifier):
    """The frozen backbone with gradients flowing back to its input embeddings and nothing
    trainable inside it: the least work a method that backpropagates through the whole backbone
    can do. A method with nothing to build, so its head, modes and checkpointing are ours."""

    def build(self) -> None:
        pass

    def encode(self, batch):
        inputs = self.backbone_inputs(batch)
        embeds = self.backbone.get_input_embeddings()(inputs.pop("input_ids"))
        return self.backbone(inputs_embeds=embeds.detach().requires_grad_(True), **inputs).last_hidden_state


def floor(model: dict, checkpointing: bool = False) -> Floor:
    method = {"name": "floor", "activation_checkpointing": checkpointing, "head": {"dropout": 0.0}}
    return Floor(model=model, method=method, num_labels=2)


def peft_config(kind: str):
    import peft

    prompt = dict(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P)
    lora = dict(task_type="FEATURE_EXTRACTION", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    ffn_out = r".*\.layer\.\d+\.output\.dense"  # the FFN's output projection (not attention.output.dense)
    return {
        "peft prefix": lambda: peft.PrefixTuningConfig(**prompt, prefix_projection=False),
        "peft prefix + MLP": lambda: peft.PrefixTuningConfig(**prompt, prefix_projection=True, encoder_hidden_size=512),
        "peft prompt tuning": lambda: peft.PromptTuningConfig(**prompt),
        "peft P-tuning LSTM": lambda: peft.PromptEncoderConfig(**prompt, encoder_reparameterization_type="LSTM",
                                                               encoder_hidden_size=128),  # per direction
        "peft P-tuning MLP": lambda: peft.PromptEncoderConfig(**prompt, encoder_reparameterization_type="MLP",
                                                              encoder_hidden_size=256),
        "peft LoRA": lambda: peft.LoraConfig(**lora),
        "peft DoRA": lambda: peft.LoraConfig(**lora, use_dora=True),
        "peft IA3": lambda: peft.IA3Config(task_type="FEATURE_EXTRACTION", feedforward_modules=ffn_out,
                                           target_modules=rf".*\.attention\.self\.(key|value)|{ffn_out}"),
    }[kind]()


class PeftTwin(nn.Module):
    """HF peft's model on the same backbone, with our head on the first real token. Modes as ours:
    train() leaves peft's model in eval mode unless method_cfg["backbone_dropout"] (peft's modules
    act alike in both modes but for their dropout, 0 here)."""

    def __init__(self, kind: str, model: dict):
        super().__init__()
        import peft

        from peft_lightning.backbone import BackboneSpec, load_backbone

        base = load_backbone(BackboneSpec(**model))
        self.model = peft.get_peft_model(base, peft_config(kind))
        self.head = ClassificationHead(base.config.hidden_size, 2, 0.0, "first")
        self.virtual = P if kind in ("peft prompt tuning", "peft P-tuning LSTM", "peft P-tuning MLP") else 0
        self.method_cfg = {"backbone_dropout": False}
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.model.train(bool(self.method_cfg["backbone_dropout"]))
        return self

    def forward(self, batch):
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.head(hidden[:, self.virtual:], batch["attention_mask"])  # (prompts come first: dropped)


def build(name: str, model: dict) -> nn.Module:
    torch.manual_seed(0)
    if name in FLOORS:
        return floor(model, FLOORS[name])
    if name in OURS:
        method, knobs, _ = OURS[name]
        return ours(method, knobs, model)
    return PeftTwin(name, model)


def reference_floor(name: str) -> str:
    return "floor + checkpointing" if name in OURS and OURS[name][1].get("activation_checkpointing") else "floor"


def default_mode(name: str) -> str | None:
    """The dropout mode conf/method/<method>.yaml trains ours in (None: not one of ours)."""
    return ("on" if method_config(OURS[name][0]).get("backbone_dropout") else "off") if name in OURS else None


# --- modes --------------------------------------------------------------------------------------

def set_mode(model: nn.Module, dropout: bool) -> None:
    """Training mode with the backbone's dropout on or off. Every config here (ours, the floor,
    the twins) reads method_cfg["backbone_dropout"] in train(), as PeftClassifier does."""
    model.method_cfg["backbone_dropout"] = dropout
    model.train()


def active_dropouts(model: nn.Module) -> int:
    """nn.Dropout modules that drop: in training mode with p > 0 (BERT's attention dropout is one of
    them: the attention reads its p only in training mode)."""
    return sum(1 for m in model.modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0)


FUSED_ATTENTION = {"_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
                   "_scaled_dot_product_flash_attention": "flash", "_flash_attention_forward": "flash",
                   "_scaled_dot_product_efficient_attention": "mem-efficient",
                   "_efficient_attention_forward": "mem-efficient", "_scaled_dot_product_cudnn_attention": "cudnn"}


def attention_backend(ops: dict[str, int]) -> str:
    """The attention kernel(s) of a step, from its aten op counts (forward ops; a checkpointed
    layer runs its forward again in backward): fused SDPA kernels by name; else the softmax calls
    of the unfused math (or eager) path."""
    fused = {}
    for op, n in ops.items():
        if op in FUSED_ATTENTION:
            fused[FUSED_ATTENTION[op]] = fused.get(FUSED_ATTENTION[op], 0) + n
    if fused:
        return ", ".join(f"{k} x{n}" for k, n in sorted(fused.items()))
    softmax = ops.get("_safe_softmax", 0) + ops.get("_softmax", 0)
    return f"math x{softmax}" if softmax else "-"


# --- work: FLOPs, saved bytes, peak memory -------------------------------------------------------

def _register_flop_formulas() -> None:
    """torch counts no FLOPs for the CPU flash-attention kernel (a dropout-off step would miss its
    attention, which a dropout-on step's math kernel counts as bmm) nor for oneDNN's LSTM layer:
    register their matmul FLOPs, with torch's formulas for its CUDA flash kernels."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    def lstm_layer(x, w_ih, w_hh) -> int:  # one direction of one layer: 4 gates over every step
        steps = 1
        for d in x[:-1]:
            steps *= d
        return 2 * steps * (w_ih[0] * w_ih[1] + w_hh[0] * w_hh[1])

    @register_flop_formula(aten.mkldnn_rnn_layer)
    def _lstm(x, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
        return lstm_layer(x, w_ih, w_hh)

    @register_flop_formula(aten.mkldnn_rnn_layer_backward)
    def _lstm_backward(x, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
        return 2 * lstm_layer(x, w_ih, w_hh)  # gradients of the inputs and of the weights


_register_flop_formulas()


class _StepLog(TorchDispatchMode):
    """FLOPs by torch.utils.flop_counter's formulas (FlopCounterMode's count without its module
    tracker, which fails on a no_grad forward through a view of a parameter: the LSTM encoder's),
    and the attention and softmax aten ops dispatched."""

    def __init__(self):
        super().__init__()
        self.flops, self.ops = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet.__name__ in FUSED_ATTENTION or packet.__name__ in ("_safe_softmax", "_softmax"):
            self.ops[packet.__name__] = self.ops.get(packet.__name__, 0) + 1
        out = func(*args, **kwargs)
        if packet in flop_registry:
            self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


def measure_work(step, model: nn.Module | None = None) -> dict:
    """Run `step()` once and return its FLOPs, the bytes autograd saves for backward (each storage
    once; `model`'s parameters and buffers are not activations) and its attention kernel."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())} if model else set()
    saved: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                saved[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, ...): not counted
            pass
        return t

    with _StepLog() as log_, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return {"flops": log_.flops, "saved_bytes": sum(saved.values()), "attention": attention_backend(log_.ops),
            "attention_ops": log_.ops}


def peak_bytes(step, device: str = "cpu") -> int:
    """Peak bytes allocated during `step()` above what was allocated when it started. (On the CPU
    the profiler cannot report the free of a block allocated before it started, "memory block of
    unknown size": such a free is missed, so the figure can err high, never miss a peak.)"""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # every allocation (+bytes) and free (-bytes) of the CPU allocator, in time order
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """This machine's dense fp32 matmul rate (GFLOP/s), best of `repeats` n^3 matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = min(timed(lambda: torch.mm(a, b, out=out), 1, "cpu") for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


# --- steps and statistics -----------------------------------------------------------------------

AUTOCAST = {"enabled": False}  # --bf16: bfloat16 autocast around every forward


def make_batch(vocab: int, batch: int, length: int, seed: int = 0):
    """Random tokens, lengths uniform in length/2..length (right padding), random labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab // 2), min(vocab, 20000), (batch, length), generator=g)  # (no special tokens)
    mask = torch.ones(batch, length, dtype=torch.long)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask[torch.arange(length)[None] >= lengths[:, None]] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)}


def _forward(model, batch):
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=AUTOCAST["enabled"]):
        return model(batch).float()


def train_step(model, optimizer, batch):
    loss = nn.functional.cross_entropy(_forward(model, batch), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # (here, so every step starts with no gradients held)


@torch.no_grad()
def eval_step(model, batch):
    _forward(model, batch)


def timed(fn, steps: int, device: str) -> float:
    """Seconds per call of `fn`, over `steps` calls."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def median_iqr(values: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile)."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[0], q[2]


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and IQR of the per-round ratios a[r] / b[r]."""
    return median_iqr([x / y for x, y in zip(a, b)])


# Run to run: two quiet runs of all.sh here (2026-11-29, docs/benchmarks.md) gave medians of the same paired
# ratio up to 0.02 apart, and verdicts on smaller differences flipped between them (an IQR ending at 0.997 in
# one run, starting at 1.003 in the other). A difference of 2% or less is not resolved by this benchmark.
NOISE = 0.02


def verdict(ratio: tuple[float, float, float]) -> str:
    """parity when the ratio's IQR spans 1.0 or its median is within NOISE of it, else faster/slower."""
    med, q1, q3 = ratio
    if q1 <= 1.0 <= q3 or abs(med - 1.0) <= NOISE:
        return "parity (inside noise)"
    return "faster" if med < 1 else "slower"


def spread(ratio: tuple[float, float, float], digits: int = 2) -> str:
    med, q1, q3 = ratio
    return f"{med:.{digits}f} [{q1:.{digits}f}-{q3:.{digits}f}]"


def rounds(entries: dict, n: int, steps: int, device: str, seed: int, label: str = "") -> dict[object, list[float]]:
    """Time every entry, (prepare, step): `prepare()` (its mode), then `step()` timed, once per
    round, in an order shuffled each round; returns each entry's seconds per step, one per round."""
    rng = random.Random(seed)
    times = {key: [] for key in entries}
    start = time.perf_counter()
    for r in range(n):
        order = list(entries)
        rng.shuffle(order)
        for key in order:
            prepare, step = entries[key]
            prepare()
            times[key].append(timed(step, steps, device))
        elapsed = time.perf_counter() - start
        log(f"{label} round {r + 1}/{n}: {elapsed:.0f} s, about {elapsed / (r + 1) * (n - r - 1):.0f} s left")
    return times


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# --- one backbone -------------------------------------------------------------------------------

def step_tables(backbone: str, args) -> list[str]:
    """Markdown lines: train steps in each mode (vs the floor and the peft twin), evaluation steps,
    activation checkpointing's memory, and the issue's targets against the paired ratios."""
    spec = {"config": TINY_ROBERTA} if args.smoke and backbone == "roberta-base-shaped" else BACKBONES[backbone]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    models = {name: build(name, spec).to(device) for name in SUITES[args.suite]}
    log(f"{backbone}: built {len(models)} configs in {time.perf_counter() - t0:.0f} s")
    vocab = models["floor"].backbone.config.vocab_size
    batch = {k: v.to(device) for k, v in make_batch(vocab, args.batch, args.length).items()}
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for n, m in models.items()}
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}
    modes = [m for m in MODES if m in args.modes]

    def entry(name, mode):
        model = models[name]
        if mode == "eval":
            return model.eval, lambda: eval_step(model, batch)
        return (lambda: set_mode(model, MODES[mode])), lambda: train_step(model, optimizers[name], batch)

    entries = {(n, m): entry(n, m) for n in models for m in modes}
    if args.eval:  # (checkpointing changes nothing without gradients)
        entries.update({(n, "eval"): entry(n, "eval") for n in models if "checkpointing" not in n})
    facts = {}
    t0 = time.perf_counter()
    for (name, mode), (prepare, step) in entries.items():  # the work step doubles as the warm-up
        prepare()
        facts[name, mode] = measure_work(step, models[name])
        facts[name, mode]["dropouts"] = active_dropouts(models[name])
        if mode != "eval":
            facts[name, mode]["peak_bytes"] = peak_bytes(step, device)
    log(f"{backbone}: FLOPs, saved bytes, kernels and peak memory of {len(entries)} entries in "
        f"{time.perf_counter() - t0:.0f} s")
    compile_s = {}
    if args.compile:  # every train entry again, compiled, timed in the same rounds as its eager self
        # (a compiled wrapper shares the model's parameters and optimizer, so both arms train one model;
        # one process compiles every config through the same transformers code objects, so dynamo's
        # default limit of 8 recompilations per code object would send later configs back to eager)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(entries))
        for (name, mode), (prepare, _) in list(entries.items()):
            if mode == "eval":
                continue
            compiled = torch.compile(models[name])
            step = (lambda c=compiled, n=name: train_step(c, optimizers[n], batch))
            entries[name, mode, "compiled"] = (prepare, step)
            prepare()
            t = time.perf_counter()
            step()  # the compilation, and the warm-up
            compile_s[name, mode] = time.perf_counter() - t
            step()
        # (a frame shared by several configs, such as a transformers layer after a graph break, can still
        # meet guards it has not seen when the configs interleave: one untimed shuffled round first)
        rounds(entries, 1, 1, device, args.seed + 1, backbone + " compile warm-up")
        log(f"{backbone}: compiled {len(compile_s)} train entries in {sum(compile_s.values()):.0f} s")
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    peaks: list[float] = []  # the matmul peak, timed in every round among the configs
    if device == "cpu":
        entries["matmul peak", "-"] = (lambda: None), lambda: peaks.append(matmul_gflops())
    times = rounds(entries, args.rounds, args.steps, device, args.seed, backbone)
    compiled_while_timing = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    peak = median_iqr(peaks) if device == "cpu" else (float("nan"),) * 3

    def ms(key):
        return spread(tuple(x * 1e3 for x in median_iqr(times[key])), 1)

    def rate(key):
        gflops = facts[key]["flops"] / 1e9 / median_iqr(times[key])[0]
        return f"{gflops:.1f} ({100 * gflops / peak[0]:.0f}%)"

    def work(*keys, field="flops"):  # GFLOP, or MiB of saved_bytes / peak_bytes
        unit, digits = (1e9, 2) if field == "flops" else (2**20, 0)
        return " / ".join(f"{facts[k][field] / unit:.{digits}f}" for k in keys)

    out = [f"Backbone **{backbone}**{' (smoke: tiny shapes, not results)' if args.smoke else ''}, batch {args.batch} "
           f"x length {args.length} (real lengths {args.length // 2}..{args.length}, right padding), fp32"
           f"{' + bf16 autocast' if args.bf16 else ''}, {device}; "
           f"{args.rounds} rounds, order shuffled each round (seed {args.seed}), {args.steps} step"
           f"{'s' if args.steps > 1 else ''} per timing. "
           f"Dense fp32 matmul peak (2048^3, best of 3 per round): **{spread(peak, 1)} GFLOP/s**.", "",
           "Times and ratios: median [IQR] over rounds; ratios paired per round (both timed in the same round); "
           "checkpointed configs against the checkpointed floor. `*`: the mode the method's conf/method yaml "
           "trains in. GFLOP: matmuls and attention of one step; saved: bytes kept for backward; peak: the "
           "step's allocation peak above its start.", ""]
    for mode in modes:
        rows = []
        for name in models:
            key, f, ref = (name, mode), facts[name, mode], reference_floor(name)
            vs = spread(paired(times[key], times[ref, mode])) if ref in models and name not in FLOORS else ""
            rows.append([name + (" `*`" if default_mode(name) == mode else ""), f["dropouts"], f["attention"],
                         f"{trainable[name]:,}", ms(key), work(key), rate(key), work(key, field="saved_bytes"),
                         work(key, field="peak_bytes"), vs])
        out += [f"**Train step, backbone dropout {mode}** (every backbone in {'eval' if mode == 'off' else 'train'} "
                "mode)", ""]
        out += table(["config", "dropouts on", "attention kernel", "trainable", "ms/step", "GFLOP/step",
                      "GFLOP/s (% of peak)", "saved MiB", "peak MiB", "x floor"], rows)
    rows = []
    for mode in modes:
        for a in models:
            b = OURS[a][2] if a in OURS else None
            if b in models:
                ka, kb = (a, mode), (b, mode)
                r = paired(times[ka], times[kb])
                rows.append([mode, a, b, f"{trainable[a]:,} / {trainable[b]:,}", work(ka, kb),
                             work(ka, kb, field="saved_bytes"), work(ka, kb, field="peak_bytes"), spread(r),
                             verdict(r)])
    out += ["**Ours against its peft twin** (train step; parity when the ratio's IQR spans 1.0 or its median is within 0.02 of it)", ""]
    out += table(["dropout", "ours", "peft twin", "trainable ours / twin", "GFLOP ours / twin", "saved MiB ours / twin",
                  "peak MiB ours / twin", "time ours / twin", "verdict"], rows)
    if args.eval:
        rows = []
        for name in models:
            if (name, "eval") in times:
                twin = OURS[name][2] if name in OURS else None
                r = paired(times[name, "eval"], times[twin, "eval"]) if twin in models else None
                rows.append([name, ms((name, "eval")), work((name, "eval")),
                             spread(paired(times[name, "eval"], times["floor", "eval"])) if name != "floor" else "",
                             spread(r) if r else "", verdict(r) if r else ""])
        out += ["**Evaluation step** (model.eval(), no gradients: no dropout anywhere; a reparameterized prompt "
                "is computed once and cached)", ""]
        out += table(["config", "ms/step", "GFLOP/step", "x floor", "x peft twin", "verdict vs twin"], rows)
    if {"off", "on"} <= set(modes):  # the setting's own effect: the same config, dropout off against on
        out += ["Dropout off / on, the same config, paired per round: " + "; ".join(
            f"{name} {spread(paired(times[name, 'off'], times[name, 'on']))}x"
            for name in models if name in FLOORS or name in ("deep prefix (ptuning_v2)", "LoRA r=8")) + ".", ""]
    if compile_s:
        rows = []
        for (name, mode), seconds in compile_s.items():
            key, twin = (name, mode), (OURS[name][2] if name in OURS else None)
            r = paired(times[name, mode, "compiled"], times[key])
            vs_twin = (spread(paired(times[name, mode, "compiled"], times[twin, mode, "compiled"]))
                       if (twin, mode) in compile_s else "")
            rows.append([mode, name, ms(key), ms((name, mode, "compiled")), spread(r), verdict(r), f"{seconds:.0f}",
                         vs_twin])
        out += ["**torch.compile** (inductor, default mode; each config compiled and eager in the same rounds, "
                "sharing parameters; the eager FLOPs above are the work of both; graphs compiled during the timed "
                f"rounds: {compiled_while_timing})", ""]
        out += table(["dropout", "config", "eager ms/step", "compiled ms/step", "compiled / eager", "verdict",
                      "compile s", "compiled: ours / peft twin"], rows)
    return out + checkpointing_lines(models, modes, facts, times) + targets(models, modes, facts, times, peak)


def table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines, and a blank line after."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(x) for x in row) + " |" for row in rows), ""]


def checkpointing_lines(models, modes, facts, times) -> list[str]:
    ours_ck, floor_ck = "deep prefix + checkpointing", "floor + checkpointing"
    if not all(n in models for n in (ours_ck, floor_ck, "peft prefix", "floor")):
        return []
    out = []
    for mode in modes:
        mib = {n: facts[n, mode]["peak_bytes"] / 2**20 for n in (ours_ck, floor_ck, "peft prefix", "floor")}
        time_ratio = spread(paired(times[ours_ck, mode], times[floor_ck, mode]))
        out.append(f"- Activation checkpointing, dropout {mode}: deep prefix + checkpointing peaks at "
                   f"{mib[ours_ck]:.0f} MiB = **{mib[ours_ck] / mib['peft prefix']:.2f}x** peft's prefix "
                   f"({mib['peft prefix']:.0f} MiB; peft cannot checkpoint with prefixes) and "
                   f"{mib[ours_ck] / mib[floor_ck]:.2f}x the checkpointed floor ({mib[floor_ck]:.0f} MiB; plain floor "
                   f"{mib['floor']:.0f} MiB); its step takes {time_ratio}x the checkpointed floor's.")
        selective, plain = "deep prefix + recompute attention", "deep prefix (ptuning_v2)"
        if selective in models and plain in models:  # item 5: the attention core only, against whole layers
            sel = facts[selective, mode]["peak_bytes"] / 2**20
            out.append(f"- Selective recomputation (attention core only), dropout {mode}: peak {sel:.0f} MiB = "
                       f"{sel / (facts[plain, mode]['peak_bytes'] / 2**20):.2f}x the plain deep prefix, "
                       f"{sel / mib[ours_ck]:.2f}x whole-layer checkpointing; step "
                       f"{spread(paired(times[selective, mode], times[plain, mode]))}x the plain deep prefix's "
                       f"({facts[selective, mode]['flops'] / 1e9:.1f} vs {facts[plain, mode]['flops'] / 1e9:.1f} GFLOP), "
                       f"{spread(paired(times[selective, mode], times[ours_ck, mode]))}x whole-layer checkpointing's.")
    return out + [""]


def targets(models, modes, facts, times, peak) -> list[str]:
    """Issue 15's targets against the paired ratios: met when the whole IQR is at or below the
    target, not met when all of it is above, undecided otherwise."""
    rows = []

    def check(what, ratio, target, work=""):
        med, q1, q3 = ratio
        parity = " (parity: equal work)" if target == 1.0 and abs(med - 1.0) <= NOISE else ""
        if q3 <= target:
            status = "met" + parity
        elif q1 > target and med > target + NOISE:
            status = "not met"
        else:  # the bound inside the IQR, or the median within the run-to-run noise of it
            status = "at the bound, inside the noise" + parity
        # (three decimals: a two-decimal IQR can read the same for a met and an undecided ratio)
        rows.append(f"| {what} | <= {target:.2f} | {spread(ratio, 3)} | {work} | {status} |")

    def gflop(*keys):
        return " / ".join(f"{facts[k]['flops'] / 1e9:.3g}" for k in keys)

    for mode in modes:
        for name in models:
            twin = OURS[name][2] if name in OURS else None
            if twin in models and not any(w in name for w in ("checkpointing", "recompute")):  # (trade time for memory)
                target = 0.97 if name.startswith("prefix + MLP") else 1.00
                check(f"{name} / {twin}, train, dropout {mode}", paired(times[name, mode], times[twin, mode]), target,
                      gflop((name, mode), (twin, mode)))
        if "deep prefix (ptuning_v2)" in models:
            key = ("deep prefix (ptuning_v2)", mode)
            check(f"deep prefix / floor, train, dropout {mode}", paired(times[key], times["floor", mode]), 1.03,
                  gflop(key, ("floor", mode)))
    pair = ("prefix + MLP 512 (prefix_tuning)", "eval"), ("deep prefix (ptuning_v2)", "eval")
    if all(k in times for k in pair):
        check("prefix + MLP / plain prefix, evaluation", paired(times[pair[0]], times[pair[1]]), 1.01, gflop(*pair))
    for mode in modes:
        if all(n in models for n in ("deep prefix + checkpointing", "peft prefix")):
            ratio = facts["deep prefix + checkpointing", mode]["peak_bytes"] / facts["peft prefix", mode]["peak_bytes"]
            rows.append(f"| peak memory, deep prefix + checkpointing / peft prefix, dropout {mode} | <= 0.60 | "
                        f"{ratio:.2f} (one measurement) | | {'met' if ratio <= 0.6 else 'not met'} |")
    if "off" in modes and peak[0] == peak[0]:
        below = [n for n in models if facts[n, "off"]["flops"] / 1e9 / median_iqr(times[n, "off"])[0] < 0.8 * peak[0]]
        rows.append(f"| every config at >= 80% of the matmul peak, dropout off | >= 80% | "
                    f"{len(models) - len(below)} of {len(models)} | below: {', '.join(below) or 'none'} | "
                    f"{'met' if not below else 'not met'} |")
    if not rows:
        return []
    return ["**Issue 15's targets** (met: the whole IQR at or below the bound; not met: all of it above and the "
            f"median more than {NOISE:.2f} above; otherwise at the bound, inside the noise).", "",
            "| target | bound | measured, median [IQR] | GFLOP | status |", "|---|---|---|---|---|", *rows, ""]


# --- data pipeline ------------------------------------------------------------------------------

def pipeline_epoch(args) -> list[str]:
    """One epoch over the first `--pipeline-examples` Rotten Tomatoes training sentences with
    P-Tuning v2 on MiniLM (dropout off, its config's mode): our pipeline (per-batch padding,
    length-grouped batches) against padding every batch to 128 tokens in shuffled order (the
    official P-Tuning v2 code), interleaved rounds, paired ratio."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from peft_lightning.data import TaskDataModule

    model = ours("ptuning_v2", dict(prefix_dropout=0.0), BACKBONES["minilm"])
    tokenizer = model.tokenizer
    dm = TaskDataModule(tokenizer, source="embedded:rotten_tomatoes", labels=["negative", "positive"],
                        batch_size=args.batch, seed=0)
    dm.setup()
    n = args.pipeline_examples
    dm.data["train"] = dm.data["train"].select(range(n))
    dm.train_lengths = dm.train_lengths[:n]
    pad128 = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=128)
    longest = DataCollatorWithPadding(tokenizer, padding="longest")  # (HF Trainer's default collator)
    loaders = {"ours": dm.train_dataloader(),
               "pad128": DataLoader(dm.data["train"], batch_size=args.batch, shuffle=True, collate_fn=pad128),
               "longest": DataLoader(dm.data["train"], batch_size=args.batch, shuffle=True, collate_fn=longest)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def epoch(loader):
        def run():
            for batch in loader:
                train_step(model, optimizer, batch)
        return run

    entries = {k: ((lambda: None), epoch(v)) for k, v in loaders.items()}
    times = rounds(entries, args.pipeline_rounds, 1, "cpu", args.seed, "pipeline")
    s = {k: spread(median_iqr(v), 1) for k, v in times.items()}
    return [f"Data pipeline: one epoch over {n} Rotten Tomatoes training sentences (P-Tuning v2 on MiniLM, batch "
            f"{args.batch}, backbone dropout off), {args.pipeline_rounds} shuffled rounds, ratios paired per round, "
            f"median [IQR]: per-batch padding + length-grouped batches (ours) {s['ours']} s; per-batch padding in "
            f"shuffled order (HF Trainer's default collator) {s['longest']} s; padding every batch to 128 tokens (the "
            f"official P-Tuning v2 code) {s['pad128']} s. Ours / per-batch padding: "
            f"**{spread(paired(times['ours'], times['longest']))}x**; ours / padding to 128: "
            f"**{spread(paired(times['ours'], times['pad128']))}x**; per-batch padding / padding to 128: "
            f"{spread(paired(times['longest'], times['pad128']))}x.", ""]


def machine() -> str:
    """The machine and library versions, for the top of a results file."""
    import transformers

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        model, flags = platform.processor() or platform.machine(), ""
        try:
            info = Path("/proc/cpuinfo").read_text()
            model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
            cpu_flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
            flags = ", " + "/".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags)
        except (OSError, StopIteration):
            pass
        device = f"CPU {model}{flags}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    try:
        import peft

        peft_version = f", peft {peft.__version__}"
    except ImportError:
        peft_version = ""
    return (f"{device} ({platform.machine()}); python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}{peft_version}")


_machine = machine  # (the old name, used by benchmarks/ensemble.py)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--suite", choices=sorted(SUITES), default="all", help="core: floors, deep prefix, LoRA")
    parser.add_argument("--modes", default="off,on", help="backbone dropout modes to run: off, on or off,on")
    parser.add_argument("--no-eval", dest="eval", action="store_false", help="skip the evaluation-step table")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1, help="steps per timing")
    parser.add_argument("--seed", type=int, default=0, help="seeds the shuffled order of every round")
    parser.add_argument("--pipeline-examples", type=int, default=0,
                        help="training sentences for the data-pipeline epoch comparison (0: skip it)")
    parser.add_argument("--pipeline-rounds", type=int, default=5)
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="check every code path fast: 2 rounds, 1 step, batch 4 x 16, a tiny roberta; not results")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU; emulated and slow on this CPU)")
    parser.add_argument("--compile", action="store_true", help="also time every train config compiled (torch.compile, inductor) beside its eager self")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes takes off, on or off,on; got {','.join(args.modes)}")
    if args.smoke:
        args.rounds, args.steps, args.batch, args.length = 2, 1, 4, 16
        args.pipeline_examples, args.pipeline_rounds = min(args.pipeline_examples, 64), 1
    AUTOCAST["enabled"] = args.bf16
    shown = list(sys.argv[1:] if argv is None else argv)
    if "--markdown" in shown:  # (where the tables go is not how they were measured)
        del shown[shown.index("--markdown"):shown.index("--markdown") + 2]
    command = " ".join(["python benchmarks/speed.py", *shown])
    lines = [f"`{command}`: {machine()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.", ""]
    lines += step_tables(args.backbone, args)
    if args.pipeline_examples:
        lines += pipeline_epoch(args)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
