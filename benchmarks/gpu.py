"""The GPU check of issues 15 (item 8) and 17 (item 4): one script, under ~7 minutes on one H200.

    bash benchmarks/gpu.sh                 # on the GPU machine: log + JSON to $OUT (or ./gpu_out)
    python benchmarks/gpu.py --dry-run     # here, on CPU: tiny shapes, same code paths, < 2 minutes

Sections, each in its own process with a hard timeout (a hang or a crash costs that section only,
and what it measured so far is kept), under one global deadline (later sections are skipped, with
the reason, when it passes):

  env      GPU, CUDA capability, torch / transformers / lightning / peft versions (and where they
           were imported from), and the bf16 dense matmul peak measured here (8192^3, CUDA events)
  train    P-Tuning v2 with conf/method/ptuning_v2.yaml's knobs (prefix length 16) on a
           roberta-large-shaped random model, through a Lightning Trainer: accelerator gpu,
           precision bf16-mixed, DDPStrategy over every GPU present (one GPU: DDP world size 1);
           synthetic batches 32 x 128 whose label is whether token 7 appears (positives carry it
           first, so the linear head on the first token can learn it); loss at some steps, median
           step time. Checks: DDP ran (if it fails, the error is kept and training reruns without
           DDP); the loss falls; every prefixed attention call sees bf16 query, key and value with
           the 16 prefix keys joined; the prefix tensors moved (gradients reached them)
  speed    mode-matched train-step speed, ours against HF peft twins (benchmarks/speed.py's PeftTwin:
           our head on peft's model), bf16 autocast, the same batch 16 x 128, in both dropout modes:
           eval (every backbone's dropout off; ours with backbone_dropout false) and train (all on;
           ours with backbone_dropout true, the twins and the floor in .train()). Per config: CUDA
           event timing over shuffled rounds (median, IQR), per-round paired ratio ours/twin and
           config/floor, FLOPs of one step (FlopCounterMode), achieved TFLOP/s and % of the measured
           peak, peak step memory (CUDA), bytes saved for backward, the active dropout modules and
           the attention kernels (SDPA backend)
  compile  torch.compile of the training step's model (P-Tuning v2, default knobs) against eager,
           same mode and batch; compile time, graph breaks; on failure the exception's first lines

Nothing here needs hydra, datasets, wandb, seqeval, gguf or nltk (absent on the GPU image); the dry
run hides them to prove it (packages carried as wheels, benchmarks/gpu_wheels.txt, stay visible).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# absent from the GPU image's package list (device KINDS.md): what the project uses elsewhere, and
# what is installed here and imported optionally by torch / httpcore / accelerate
ABSENT_ON_GPU_IMAGE = ("hydra", "hydra-core", "omegaconf", "datasets", "wandb", "seqeval", "gguf", "nltk",
                       "boto3", "botocore", "s3transfer", "jmespath", "dill", "trio", "outcome", "sniffio")
SECTIONS = ("env", "train", "speed", "compile")
PREFIX = 16

ROBERTA_LARGE = {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 1024, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "intermediate_size": 4096, "max_position_embeddings": 514,
                 "pad_token_id": 1}
TINY = {"model_type": "roberta", "vocab_size": 5000, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 514, "pad_token_id": 1}

# shapes and budgets (seconds): GPU run | CPU dry run
SIZES = {
    False: {"model": ROBERTA_LARGE, "matmul": 8192, "train_batch": 32, "train_length": 128, "train_steps": 60,
            "speed_batch": 16, "speed_length": 128, "rounds": 20, "min_rounds": 10, "steps": 5, "warmup": 3,
            "compile_batch": 32, "compile_length": 128, "compile_steps": 15, "compile_backend": "inductor",
            "budget": 410, "caps": {"env": 75, "train": 150, "speed": 200, "compile": 240},
            "need": {"env": 20, "train": 45, "speed": 60, "compile": 60}},
    True: {"model": TINY, "matmul": 256, "train_batch": 8, "train_length": 32, "train_steps": 12,
           "speed_batch": 4, "speed_length": 32, "rounds": 3, "min_rounds": 3, "steps": 1, "warmup": 0,
           "compile_batch": 8, "compile_length": 32, "compile_steps": 2, "compile_backend": "aot_eager",
           "budget": 115, "caps": {"env": 30, "train": 40, "speed": 60, "compile": 60},
           "need": {"env": 5, "train": 10, "speed": 10, "compile": 10}},
}


def log(message: str) -> None:
    print(message, flush=True)


# --- hiding the packages the GPU image lacks (dry run) ------------------------------------------

def carried_wheels() -> set[str]:
    path = ROOT / "benchmarks" / "gpu_wheels.txt"
    if not path.exists():
        return set()
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line.split("==")[0].strip().lower().replace("_", "-"))
    return names


def hide_packages(names: set[str]) -> None:
    """Make `names` look uninstalled to imports, find_spec and importlib.metadata (what the GPU
    image looks like), by wrapping every meta-path finder."""
    top = {n.replace("-", "_") for n in names}
    dists = {n.replace("_", "-") for n in names}

    class Hide:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in top:
                return None
            finder = getattr(self.inner, "find_spec", None)
            return finder(name, path, target) if finder else None

        def find_distributions(self, *args, **kwargs):
            finder = getattr(self.inner, "find_distributions", None)
            if finder is None:
                return []
            return [d for d in finder(*args, **kwargs)
                    if (d.metadata["Name"] or "").lower().replace("_", "-") not in dists]

        def invalidate_caches(self):
            if hasattr(self.inner, "invalidate_caches"):
                self.inner.invalidate_caches()

    for name in list(sys.modules):
        if name.split(".")[0] in top:
            del sys.modules[name]
    sys.meta_path[:] = [f if isinstance(f, Hide) else Hide(f) for f in sys.meta_path]


# --- a section's results, written as they come (a killed section keeps what it had) -------------

class Record:
    def __init__(self, path: str | None):
        self.path, self.data = path, {}

    def __setitem__(self, key, value):
        self.data[key] = value
        self.flush()

    def flush(self):
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def first_lines(exc: BaseException, n: int = 6) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    return "\n".join(text[:n])


# --- shared helpers (child processes) -------------------------------------------------------------

def device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_spec(sizes) -> dict:
    return {"config": dict(sizes["model"]), "attn_implementation": "sdpa"}


def build_on(dev: str, make, label: str = ""):
    """`make()` with tensors created on `dev` (random init of a large model on the GPU takes
    seconds, on the CPU several per model); if that fails, on the CPU and moved."""
    import torch

    try:
        with torch.device(dev):
            model = make()
        where = dev
    except Exception as exc:  # noqa: BLE001
        log(f"  build {label} under torch.device({dev}) failed ({first_lines(exc, 1)}); building on the CPU")
        model = make()
        where = "cpu, moved"
    return model.to(dev), where


def token7_batches(n: int, length: int, vocab: int, seed: int = 0) -> dict:
    """n sequences of random tokens (ids >= 10, never 7); label 1 for half of them, which carry
    token 7 first (where the head reads) and once more at a random position."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, length), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(1, length, (n,), generator=g)
    pos = labels.bool()
    ids[pos, 0] = 7
    ids[torch.arange(n)[pos], where[pos]] = 7
    return {"input_ids": ids, "attention_mask": torch.ones(n, length, dtype=torch.long), "labels": labels}


def method_config(name: str, **overrides) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "conf" / "method" / f"{name}.yaml").read_text())
    cfg.update(overrides)
    return cfg


# --- env ------------------------------------------------------------------------------------------

def section_env(args, sizes, rec: Record) -> None:
    import platform

    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "dry_run": args.dry_run}
    for name in ("transformers", "lightning", "peft", "torchmetrics", "huggingface_hub", "tokenizers", "omegaconf",
                 "accelerate", "safetensors", "triton"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
            info[name + "_from"] = str(Path(module.__file__).parent)
        except Exception as exc:  # noqa: BLE001 - recorded
            info[name] = f"missing: {first_lines(exc, 1)}"
    info["pythonpath"] = os.environ.get("PYTHONPATH", "")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                    sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
        try:
            info["sdpa_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                    "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                    "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                    "math": torch.backends.cuda.math_sdp_enabled()}
        except Exception as exc:  # noqa: BLE001
            info["sdpa_enabled"] = f"unknown: {first_lines(exc, 1)}"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=15)
            info["nvidia_smi"] = smi.stdout.strip()
        except Exception as exc:  # noqa: BLE001
            info["nvidia_smi"] = f"failed: {first_lines(exc, 1)}"
    else:
        info["gpu"] = None
        info["gpu_note"] = "no CUDA device: CPU dry run (GPU-only figures skipped)"
    rec["info"] = info
    for k, v in info.items():
        log(f"  {k}: {v}")
    if str(info.get("transformers", "")).startswith("5.") and "/tmp/site" not in info.get("transformers_from", "") \
            and torch.cuda.is_available():
        log("  NOTE: transformers is the image's own, not the carried wheel (was the pip install line run?)")

    n = sizes["matmul"]
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    flops = 2 * n ** 3
    times = []
    for _ in range(3):
        a @ b
    sync()
    for _ in range(10):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    tflops = sorted(flops / t / 1e12 for t in times)
    peak = {"n": n, "dtype": "bfloat16", "tflops_median": statistics.median(tflops), "tflops_max": tflops[-1],
            "tflops_min": tflops[0], "timer": "cuda events" if torch.cuda.is_available() else "perf_counter (CPU)"}
    rec["bf16_matmul_peak"] = peak
    log(f"  bf16 matmul {n}^3: median {peak['tflops_median']:.1f} TFLOP/s (min {peak['tflops_min']:.1f}, "
        f"max {peak['tflops_max']:.1f}; 10 products after 3 warm-ups, {peak['timer']})")


# --- train: Lightning, DDP, bf16-mixed ---------------------------------------------------------------

def section_train(args, sizes, rec: Record) -> None:
    import datetime

    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, Dataset

    import peft_lightning.injection.prefix as prefix_module
    from peft_lightning.methods import METHODS

    L.seed_everything(0, workers=True)
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    world = max(gpus, 1)
    batch, length, steps = sizes["train_batch"], sizes["train_length"], sizes["train_steps"]
    cfg = method_config("ptuning_v2", prefix_length=PREFIX)
    data = token7_batches(batch * steps * world, length, sizes["model"]["vocab_size"], seed=0)

    class Synthetic(Dataset):
        def __len__(self):
            return data["labels"].shape[0]

        def __getitem__(self, i):
            return {k: v[i] for k, v in data.items()}

    seen: dict[tuple, int] = {}
    original = prefix_module.sdpa_attention_forward

    def recording(mod, query, key, value, attention_mask, **kwargs):
        k = (str(query.dtype).removeprefix("torch."), str(key.dtype).removeprefix("torch."),
             str(value.dtype).removeprefix("torch."), int(query.shape[-2]), int(key.shape[-2]),
             None if attention_mask is None else str(attention_mask.dtype).removeprefix("torch."),
             bool(torch.is_autocast_enabled(query.device.type)))
        seen[k] = seen.get(k, 0) + 1
        return original(mod, query, key, value, attention_mask, **kwargs)

    class Probe(L.Callback):
        def __init__(self):
            self.losses, self.times, self.t0 = [], [], 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            self.times.append(time.perf_counter() - self.t0)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))
            i = len(self.losses) - 1
            if trainer.is_global_zero and (i in (0, 1, 2, 5, 10, 20, 30, 40, 50) or i == steps - 1):
                log(f"  step {i:3d}  loss {self.losses[-1]:.4f}  {self.times[-1] * 1e3:.1f} ms")

    def fit(strategy, devices):
        seen.clear()
        t0 = time.perf_counter()
        module = METHODS["ptuning_v2"](model=model_spec(sizes), method=cfg, num_labels=2, labels=["no 7", "has 7"])
        build_s = time.perf_counter() - t0
        before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad and "prefix" in n}
        probe = Probe()
        trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=devices, strategy=strategy,
                            precision="bf16-mixed", max_steps=steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=[probe], default_root_dir=tempfile.mkdtemp(prefix="gpu_"))
        counts = module.parameter_counts()
        log(f"  Trainer: accelerator {'gpu' if cuda else 'cpu'}, devices {devices}, strategy "
            f"{type(trainer.strategy).__name__}, precision bf16-mixed; built on the CPU in {build_s:.1f} s; "
            f"trainable {counts['trainable']:,} of {counts['total']:,}")
        loader = DataLoader(Synthetic(), batch_size=batch, shuffle=False, num_workers=0, drop_last=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        prefix_module.sdpa_attention_forward = recording
        t0 = time.perf_counter()
        try:
            trainer.fit(module, train_dataloaders=loader)
        finally:
            prefix_module.sdpa_attention_forward = original
        return module, counts, before, probe, trainer, time.perf_counter() - t0, build_s

    ddp_error = None
    try:
        strategy = DDPStrategy(find_unused_parameters=False, timeout=datetime.timedelta(seconds=30))
        module, counts, before, probe, trainer, fit_s, build_s = fit(strategy, world)
    except Exception as exc:  # noqa: BLE001 - recorded; the run goes on without DDP
        ddp_error = first_lines(exc, 8)
        traceback.print_exc()
        log(f"  DDP FAILED: {ddp_error}\n  retrying on one device without DDP (strategy auto)")
        rec["ddp_error"] = ddp_error
        module, counts, before, probe, trainer, fit_s, build_s = fit("auto", 1)
    if not trainer.is_global_zero:
        return
    losses, times = probe.losses, probe.times
    k = max(1, min(5, len(losses) // 4))
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    step_ms = statistics.median(times[min(5, len(times) - 1):]) * 1e3 if times else float("nan")
    params = dict(module.named_parameters())  # (state_dict holds a free prefix flat, the parameter is kv layout)
    moved = max(((params[n].detach().cpu().float() - v.cpu().float()).abs().max().item()
                 for n, v in before.items()), default=0.0)
    calls = [{"query_dtype": k[0], "key_dtype": k[1], "value_dtype": k[2], "query_len": k[3], "key_len": k[4],
              "mask_dtype": k[5], "autocast": k[6], "calls": c} for k, c in seen.items()]
    train_calls = [c for c in calls if c["autocast"]]
    checks = {
        "ddp": ddp_error is None,
        "loss_falls": last < 0.8 * first,
        "prefix_bf16_under_autocast": bool(train_calls) and all(
            c["query_dtype"] == c["key_dtype"] == c["value_dtype"] == "bfloat16" for c in train_calls),
        "prefix_joined": bool(train_calls) and all(c["key_len"] == c["query_len"] + PREFIX for c in train_calls),
        "prefix_moved": moved > 0,
        "ran_all_steps": len(losses) == steps,
    }
    rec["result"] = {
        "model": "roberta-large-shaped random" if not args.dry_run else "tiny roberta (dry run)",
        "model_config": sizes["model"], "method": cfg, "batch": batch, "length": length, "steps": steps,
        "strategy": type(trainer.strategy).__name__, "world_size": trainer.world_size, "gpus_present": gpus,
        "note": (f"DDP failed ({ddp_error.splitlines()[-1]}); ran without DDP" if ddp_error else
                 f"DDP over {world} GPUs" if world > 1 else
                 "DDP over the 1 GPU present: world size 1 (DDP wrapper, a one-rank process group: the gradient "
                 "all-reduce exchanges nothing)" if cuda else "DDP over 1 CPU process (gloo), dry run"),
        "ddp_error": ddp_error,
        "precision": str(trainer.precision), "trainable": counts["trainable"], "total": counts["total"],
        "losses": losses, "loss_first": first, "loss_last": last, "step_ms_median": step_ms,
        "step_ms_all": [t * 1e3 for t in times], "tokens_per_s": batch * length * world / (step_ms / 1e3),
        "fit_s": fit_s, "build_s": build_s, "prefix_max_change": moved, "attention_calls": calls,
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
    rec["checks"] = checks
    log(f"  world size {trainer.world_size} ({rec.data['result']['note']}); fit {fit_s:.1f} s")
    log(f"  loss first {k} steps {first:.4f} -> last {k} {last:.4f}; median step {step_ms:.1f} ms "
        f"({rec.data['result']['tokens_per_s']:,.0f} tokens/s); prefix moved by up to {moved:.3g}")
    for c in calls:
        log(f"  attention call: {c}")
    for name, ok in checks.items():
        log(f"  CHECK {name}: {'pass' if ok else 'FAIL'}")


# --- speed: mode-matched, ours vs peft twins ------------------------------------------------------

PAIRS = [  # label, our method, our knobs, speed.PeftTwin kind
    ("deep prefix (ptuning_v2, no reparam)", "ptuning_v2", {"reparameterization": "none", "prefix_dropout": 0.0},
     "peft prefix"),
    ("prefix + MLP 512 (prefix_tuning)", "prefix_tuning", {"reparameterization": "mlp", "reparam_hidden": 512},
     "peft prefix + MLP"),
    ("prompt tuning", "prompt_tuning", {"init": "random"}, "peft prompt tuning"),
    ("LoRA r=8 query,value", "lora", {"r": 8, "alpha": 16, "dropout": 0.0}, "peft LoRA"),
]
MODES = ("eval", "train")  # eval: every backbone's dropout off; train: all on


def section_speed(args, sizes, rec: Record) -> None:
    import torch
    from torch import nn

    from benchmarks import speed as S  # the configs and the measuring helpers, shared with the CPU benchmark

    assert S.P == PREFIX
    dev = device()
    cuda = dev == "cuda"
    spec = model_spec(sizes)
    peak_tflops = args.peak_tflops
    deadline = args.deadline or (time.time() + 1e9)

    def build(name):
        torch.manual_seed(0)
        if name == "floor":
            return S.floor(spec)
        for label, method, knobs, twin in PAIRS:
            if name == label:
                return S.ours(method, knobs, spec)
        return S.PeftTwin(name, spec)

    names = ["floor"] + [p[0] for p in PAIRS] + [p[3] for p in PAIRS]
    models, errors = {}, {}
    for name in names:
        t0 = time.perf_counter()
        try:
            models[name], where = build_on(dev, lambda name=name: build(name), name)
            log(f"  built {name} ({where}) in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:  # noqa: BLE001
            errors[name] = first_lines(exc)
            log(f"  BUILD FAILED {name}: {errors[name]}")
    rec["build_errors"] = errors
    vocab = sizes["model"]["vocab_size"]
    batch = {k: v.to(dev) for k, v in S.make_batch(vocab, sizes["speed_batch"], sizes["speed_length"]).items()}
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]
                                       or [torch.zeros(1, requires_grad=True, device=dev)], lr=1e-5)
                  for n, m in models.items()}
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}

    def step(name):
        m = models[name]
        with torch.autocast(dev, dtype=torch.bfloat16):
            logits = m(batch)
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    entries = [(n, mode) for n in models for mode in MODES]
    facts, broken = {}, {}
    t_facts = time.perf_counter()
    for name, mode in entries:  # warm-up, then one step each for FLOPs/kernels and one for memory
        key = f"{name} | {mode}"
        try:
            S.set_mode(models[name], mode == "train")
            for _ in range(sizes["warmup"]):
                step(name)
            sync()
            work = S.measure_work(lambda: step(name), models[name])
            sync()
            fact = {"gflop": work["flops"] / 1e9, "attention_ops": work["attention_ops"],
                    "attention_backend": work["attention"], "saved_for_backward_mib": work["saved_bytes"] / 2**20,
                    "active_dropouts": S.active_dropouts(models[name]), "trainable": trainable[name]}
            if cuda:
                fact["peak_mib"] = S.peak_bytes(lambda: step(name), "cuda") / 2**20
            facts[key] = fact
        except Exception as exc:  # noqa: BLE001
            broken[key] = first_lines(exc)
            log(f"  FAILED {key}: {broken[key]}")
    log(f"  warm-up ({sizes['warmup']} steps), FLOP/kernel step{' and memory step' if cuda else ''} of "
        f"{len(entries)} configs in {time.perf_counter() - t_facts:.1f} s")
    if not cuda:
        log("  peak memory: skipped (CUDA only: max_memory_allocated)")
    rec["facts"] = facts
    rec["broken"] = broken
    entries = [e for e in entries if f"{e[0]} | {e[1]}" not in broken]
    times = {f"{n} | {m}": [] for n, m in entries}
    rng = random.Random(0)
    steps = sizes["steps"]
    rounds_done = 0
    t_rounds = time.perf_counter()
    for r in range(sizes["rounds"]):
        if r and time.time() > deadline:
            log(f"  deadline: stopping after {r} rounds" + (f" (fewer than the {sizes['min_rounds']} wanted)"
                                                            if r < sizes["min_rounds"] else ""))
            break
        order = entries[:]
        rng.shuffle(order)
        for name, mode in order:
            S.set_mode(models[name], mode == "train")
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    step(name)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3 / steps
            else:
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(name)
                seconds = (time.perf_counter() - t0) / steps
            times[f"{name} | {mode}"].append(seconds)
        rounds_done = r + 1
        rec["rounds_done"] = rounds_done
        rec["times_s"] = times
    rounds_s = time.perf_counter() - t_rounds
    log(f"  {rounds_done} rounds x {len(entries)} configs x {steps} steps in {rounds_s:.1f} s "
        f"(order shuffled each round; timer: {'CUDA events' if cuda else 'perf_counter'})")

    def stats(key):
        med, q1, q3 = S.median_iqr(times[key])
        out = {"ms_median": med * 1e3, "ms_q1": q1 * 1e3, "ms_q3": q3 * 1e3, **facts.get(key, {})}
        if "gflop" in out and med > 0:
            out["tflops"] = out["gflop"] / 1e3 / med
            out["pct_of_peak"] = 100 * out["tflops"] / peak_tflops if peak_tflops else None
        return out

    def paired(a, b):
        ratios = [x / y for x, y in zip(times[a], times[b])]
        if not ratios:
            return None
        med, q1, q3 = S.median_iqr(ratios)
        verdict = "parity (IQR spans 1)" if q1 <= 1.0 <= q3 else ("faster" if med < 1 else "slower")
        return {"median": med, "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios), "verdict": verdict}

    def fmt(s):
        pct = f"{s['pct_of_peak']:.0f}%" if s.get("pct_of_peak") is not None else "n/a"
        mem = f"{s['peak_mib']:.0f}" if s.get("peak_mib") is not None else "n/a"
        return (f"{s['ms_median']:.2f} ms [IQR {s['ms_q1']:.2f}-{s['ms_q3']:.2f}], "
                f"{s.get('gflop', float('nan')):.4g} GFLOP, "
                f"{s.get('tflops', float('nan')):.3g} TFLOP/s = {pct} of peak, peak {mem} MiB, "
                f"saved {s.get('saved_for_backward_mib', float('nan')):.4g} MiB, "
                f"dropouts {s.get('active_dropouts', '?')}, "
                f"sdpa {s.get('attention_backend', '?')}")

    rows = []
    log(f"  batch {sizes['speed_batch']} x {sizes['speed_length']} (random lengths), bf16 autocast, "
        f"peak {peak_tflops or float('nan'):.0f} TFLOP/s")
    for mode in MODES:
        floor_key = f"floor | {mode}"
        if times.get(floor_key):
            fs = stats(floor_key)
            rows.append({"mode": mode, "config": "floor", "ours": fs})
            log(f"  [{mode}] floor (frozen backbone, input embeddings require grad): trainable "
                f"{trainable['floor']:,}; {fmt(fs)}")
        for label, _, _, twin in PAIRS:
            a, b = f"{label} | {mode}", f"{twin} | {mode}"
            if a not in times or b not in times or not times[a] or not times[b]:
                why = broken.get(a) or broken.get(b) or errors.get(label) or errors.get(twin)
                log(f"  [{mode}] {label}: missing ({why})")
                rows.append({"mode": mode, "config": label, "twin": twin, "missing": True})
                continue
            row = {"mode": mode, "config": label, "twin": twin, "ours": stats(a), "peft": stats(b),
                   "ratio_ours_over_peft": paired(a, b),
                   "ours_over_floor": paired(a, floor_key) if floor_key in times else None,
                   "peft_over_floor": paired(b, floor_key) if floor_key in times else None}
            rows.append(row)
            r = row["ratio_ours_over_peft"]
            log(f"  [{mode}] {label} vs {twin}: trainable {trainable[label]:,} vs {trainable[twin]:,}; "
                f"ours/peft {r['median']:.3f} (IQR {r['q1']:.3f}-{r['q3']:.3f}, min-max {r['min']:.3f}-{r['max']:.3f}: "
                f"{r['verdict']})")
            log(f"      ours: {fmt(row['ours'])}")
            log(f"      peft: {fmt(row['peft'])}")
            if row["ours_over_floor"]:
                log(f"      x floor (paired median): ours {row['ours_over_floor']['median']:.3f}, "
                    f"peft {row['peft_over_floor']['median']:.3f}")
            rec["rows"] = rows
    rec["rows"] = rows
    rec["setup"] = {"batch": sizes["speed_batch"], "length": sizes["speed_length"], "rounds": rounds_done,
                    "steps_per_round": steps, "warmup_steps": sizes["warmup"], "peak_tflops": peak_tflops,
                    "trainable": trainable, "head": "speed.py ClassificationHead on the first real token, dropout 0",
                    "loss": "cross entropy, float32 logits", "timer": "cuda events" if cuda else "perf_counter",
                    "modes": {"eval": "every backbone's dropout off (ours: backbone_dropout false; "
                                      "twins and floor .eval())",
                              "train": "every backbone's dropout on (ours: backbone_dropout true; "
                                       "twins and floor .train())"}}


# --- compile -------------------------------------------------------------------------------------

def section_compile(args, sizes, rec: Record) -> None:
    import torch
    from torch import nn

    from peft_lightning.methods import METHODS

    dev = device()
    cuda = dev == "cuda"
    deadline = args.deadline or (time.time() + 1e9)
    backend = args.compile_backend or sizes["compile_backend"]
    if not cuda and backend != "inductor":
        log(f"  CPU dry run: backend {backend!r} (dynamo + AOT autograd, no code generation); "
            "the GPU run uses inductor")
    torch.manual_seed(0)
    cfg = method_config("ptuning_v2", prefix_length=PREFIX)
    module, where = build_on(dev, lambda: METHODS["ptuning_v2"](model=model_spec(sizes), method=cfg, num_labels=2))
    module.train()  # backbone in eval mode (backbone_dropout false), prefix dropout 0.1
    batch = {k: v.to(dev) for k, v in token7_batches(sizes["compile_batch"], sizes["compile_length"],
                                                     sizes["model"]["vocab_size"], seed=1).items()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)

    def step(forward):
        with torch.autocast(dev, dtype=torch.bfloat16):
            logits = forward(batch)
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def timed(forward, n):
        out = []
        for _ in range(n):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(forward)
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step(forward)
                out.append((time.perf_counter() - t0) * 1e3)
        return out

    n = sizes["compile_steps"]
    rec_start = time.time()
    for _ in range(3):
        step(module)
    eager = timed(module, n)
    log(f"  eager: median {statistics.median(eager):.2f} ms over {n} steps (batch {sizes['compile_batch']} x "
        f"{sizes['compile_length']}, bf16 autocast)")
    rec["eager_ms"] = eager
    from torch._dynamo.utils import counters

    result = {"backend": backend, "target": None}
    compiled = None
    for target in ("module", "backbone"):
        torch._dynamo.reset()
        counters.clear()
        try:
            if target == "module":
                compiled = torch.compile(module, backend=backend)
            else:
                module.backbone.compile(backend=backend)
                compiled = module
            rec["compile"] = {**result, "status": f"compiling ({target}) since {time.time() - rec_start:.0f} s"}
            t0 = time.perf_counter()
            step(compiled)
            sync()
            first = time.perf_counter() - t0
            result.update(target=target, first_step_s=first)
            log(f"  compile ({target}, {backend}): first step {first:.1f} s")
            break
        except Exception as exc:  # noqa: BLE001
            result[f"failed_{target}"] = first_lines(exc, 8)
            log(f"  compile: failed ({target}): {first_lines(exc, 8)}")
            if target == "backbone":
                compiled = None
    breaks = counters.get("graph_break", {})
    result["graph_breaks"] = sum(breaks.values())
    result["build"] = where
    result["graph_break_reasons"] = [str(k)[:300] for k, _ in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]]
    result["unique_graphs"] = counters.get("stats", {}).get("unique_graphs")
    log(f"  graph breaks: {result['graph_breaks']}; unique graphs: {result['unique_graphs']}")
    for reason in result["graph_break_reasons"]:
        log(f"    break: {reason[:200]}")
    rec["compile"] = result
    if compiled is None:
        result["status"] = "failed"
        rec["compile"] = result
        return
    try:
        for _ in range(2):
            step(compiled)
        compiled_ms = timed(compiled, n)
        eager2, compiled2 = [], []
        if time.time() < deadline - 20:  # a second interleaved block, when there is time
            eager2 = timed(module, n) if target == "module" else []
            compiled2 = timed(compiled, n)
    except Exception as exc:  # noqa: BLE001
        result.update(status="failed", failed_timing=first_lines(exc, 8))
        rec["compile"] = result
        log(f"  compile: failed after the first step: {first_lines(exc, 8)}")
        return
    e = statistics.median(eager + eager2)
    c = statistics.median(compiled_ms + compiled2)
    result.update(status="ok", eager_ms_median=e, compiled_ms_median=c, speedup=e / c,
                  eager_ms=eager + eager2, compiled_ms=compiled_ms + compiled2,
                  note=("eager second block skipped: the backbone itself was compiled in place"
                        if target == "backbone" else ""))
    rec["compile"] = result
    log(f"  eager {e:.2f} ms vs compiled {c:.2f} ms: speedup x{e / c:.2f} ({target}, {backend})")


# --- the parent: sections in child processes, one deadline, one JSON -------------------------------

def run_section(args) -> int:
    sizes = SIZES[args.dry_run]
    # under DDP over several GPUs Lightning re-runs this command once per extra rank: rank 0 writes
    rec = Record(args.json if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 else None)
    rec["section"] = args.section
    t0 = time.perf_counter()
    try:
        {"env": section_env, "train": section_train, "speed": section_speed,
         "compile": section_compile}[args.section](args, sizes, rec)
        rec["status"] = rec.data.get("status", "ok")
        return 0
    except Exception as exc:  # noqa: BLE001
        rec["status"] = "error"
        rec["error"] = first_lines(exc, 12)
        traceback.print_exc()
        return 1
    finally:
        rec["section_s"] = time.perf_counter() - t0


def summarize(results: dict) -> None:
    """The figures that matter, again, at the end of the log (where a tail shows them)."""
    sections = results["sections"]
    info = (sections.get("env") or {}).get("info") or {}
    peak = (sections.get("env") or {}).get("bf16_matmul_peak") or {}
    if info:
        log(f"   {info.get('gpu') or 'CPU (dry run)'} x{info.get('gpu_count', 0)}, "
            f"capability {info.get('capability')}; "
            f"torch {info.get('torch')}, transformers {info.get('transformers')}, lightning {info.get('lightning')}, "
            f"peft {info.get('peft')}; bf16 matmul peak {peak.get('tflops_median', float('nan')):.1f} TFLOP/s")
    train = (sections.get("train") or {}).get("result")
    if train:
        log(f"   train: {train['strategy']} world size {train['world_size']}, {train['precision']}, "
            f"{train['steps']} steps of {train['batch']} x {train['length']}: loss {train['loss_first']:.3f} -> "
            f"{train['loss_last']:.3f}, median step {train['step_ms_median']:.1f} ms")
    rows = (sections.get("speed") or {}).get("rows") or []
    if rows:
        log("   speed (ms/step median; ratio = per-round paired median [min-max]; GFLOP; % of peak; peak MiB):")
    for row in rows:
        if row.get("missing"):
            log(f"   [{row['mode']:5s}] {row['config']}: missing")
        elif row["config"] == "floor":
            o = row["ours"]
            log(f"   [{row['mode']:5s}] floor: {o['ms_median']:.2f} ms; {o.get('gflop', 0):.4g} GFLOP; "
                f"{o.get('pct_of_peak') or 0:.0f}%; {o.get('peak_mib', float('nan')):.0f} MiB; "
                f"dropouts {o.get('active_dropouts')}; sdpa {o.get('attention_backend')}")
        else:
            o, p, r = row["ours"], row["peft"], row["ratio_ours_over_peft"]
            log(f"   [{row['mode']:5s}] {row['config']}: ours {o['ms_median']:.2f} / peft {p['ms_median']:.2f} ms = "
                f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] {r['verdict']}; GFLOP {o.get('gflop', 0):.4g} / "
                f"{p.get('gflop', 0):.4g}; {o.get('pct_of_peak') or 0:.0f}% / {p.get('pct_of_peak') or 0:.0f}%; "
                f"MiB {o.get('peak_mib', float('nan')):.0f} / {p.get('peak_mib', float('nan')):.0f}; "
                f"trainable {o.get('trainable', 0):,} / {p.get('trainable', 0):,}")


def orchestrate(args) -> int:
    start = time.time()
    sizes = SIZES[args.dry_run]
    budget = args.budget or sizes["budget"]
    deadline = start + budget
    out = Path(args.out or os.environ.get("OUT") or ROOT / "gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    results = {"script": "benchmarks/gpu.py", "argv": sys.argv[1:], "dry_run": args.dry_run,
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget,
               "hidden_packages": sorted(args.hidden), "sections": {}}
    path = out / "gpu_results.json"

    def save():
        results["elapsed_s"] = time.time() - start
        path.write_text(json.dumps(results, indent=1, default=str))

    log(f"== gpu.py {'DRY RUN (CPU, tiny shapes)' if args.dry_run else ''} budget {budget} s; results -> {path}")
    if args.hidden:
        log(f"   hidden (absent on the GPU image, not carried): {', '.join(sorted(args.hidden))}")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_sections_"))
    peak = args.peak_tflops  # (given: for a rerun of some sections without env)
    failed = []
    for name in args.sections:
        remaining = deadline - time.time()
        if remaining < sizes["need"][name]:
            reason = f"skipped: {remaining:.0f} s left of the {budget} s budget (needs {sizes['need'][name]} s)"
            log(f"== section {name}: {reason}")
            results["sections"][name] = {"status": reason}
            failed.append(name)
            save()
            continue
        timeout = min(sizes["caps"][name], remaining)
        child_json = tmp / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--json", str(child_json),
               "--deadline", f"{time.time() + timeout - 25:.0f}"]
        if args.dry_run:
            cmd.append("--dry-run")
        if args.hidden:
            cmd += ["--hide", ",".join(sorted(args.hidden))]
        if peak:
            cmd += ["--peak-tflops", f"{peak:.3f}"]
        if args.compile_backend:
            cmd += ["--compile-backend", args.compile_backend]
        log(f"\n== section {name} (timeout {timeout:.0f} s; {time.time() - start:.0f} s elapsed)")
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            log(f"== section {name}: TIMED OUT after {timeout:.0f} s: killing its process group")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log("   (child did not exit after SIGKILL; moving on)")
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers (compile workers) of a finished section
        except (ProcessLookupError, PermissionError):
            pass
        data = {}
        if child_json.exists():
            try:
                data = json.loads(child_json.read_text())
            except ValueError as exc:
                data = {"json_error": str(exc)}
        data["rc"] = rc
        data["wall_s"] = time.time() - t0
        if rc != 0:
            data["status"] = "timeout" if rc == "timeout" else data.get("status", f"exit {rc}")
            failed.append(name)
        results["sections"][name] = data
        if name == "env":
            peak = (data.get("bf16_matmul_peak") or {}).get("tflops_median")
        save()
        log(f"== section {name}: {data.get('status')} in {data['wall_s']:.1f} s (total {time.time() - start:.1f} s)")
    checks = {}
    for name, data in results["sections"].items():
        for check, ok in (data.get("checks") or {}).items():
            checks[f"{name}.{check}"] = ok
    section = results["sections"].get("compile", {})
    compiled = section.get("compile") or {}
    if compiled.get("speedup"):
        summary = (f"compile: ok ({compiled['target']}, {compiled['backend']}): "
                   f"eager {compiled['eager_ms_median']:.2f} ms, "
                   f"compiled {compiled['compiled_ms_median']:.2f} ms, x{compiled['speedup']:.2f}; first step "
                   f"{compiled['first_step_s']:.1f} s; graph breaks {compiled.get('graph_breaks')}")
    elif compiled.get("status") == "failed":
        reasons = [compiled[k] for k in ("failed_module", "failed_backbone", "failed_timing") if k in compiled]
        summary = "compile: failed: " + " | ".join(r.replace("\n", " / ")[:300] for r in reasons)
    elif section.get("status") == "timeout":
        summary = (f"compile: timed out (section killed after {section.get('wall_s', 0):.0f} s; "
                   f"last state: {compiled.get('status', 'before compiling')})")
    else:
        summary = f"compile: {section.get('status', 'not run')}" + (f": {str(section['error'])[:300]}"
                                                                    if section.get("error") else "")
    results["compile_summary"] = summary
    results["checks"] = checks
    results["failed_sections"] = failed
    save()
    log("\n== summary")
    summarize(results)
    for check, ok in checks.items():
        log(f"   CHECK {check}: {'pass' if ok else 'FAIL'}")
    log(f"   {results['compile_summary']}")
    log(f"   sections not ok: {', '.join(failed) or 'none'}; total {time.time() - start:.1f} s; JSON {path}")
    return 0 if not failed and all(checks.values()) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 3 rounds (< 2 minutes)")
    parser.add_argument("--out", help="folder for gpu_results.json (default: $OUT, else ./gpu_out)")
    parser.add_argument("--budget", type=float, help="global deadline in seconds (410 GPU, 115 dry run)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in order")
    parser.add_argument("--compile-backend", help="torch.compile backend (inductor on GPU, aot_eager in the dry run)")
    parser.add_argument("--hide", help="packages to make look uninstalled (default in the dry run: those absent "
                                       "on the GPU image and not in gpu_wheels.txt)")
    parser.add_argument("--no-hide", action="store_true")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--peak-tflops", type=float, help="bf16 peak for %% of peak when env is not rerun")
    args = parser.parse_args(argv)
    if args.hide is not None:
        hidden = {h for h in args.hide.split(",") if h}
    elif args.dry_run and not args.no_hide:
        hidden = set(ABSENT_ON_GPU_IMAGE) - carried_wheels()
    else:
        hidden = set()
    args.hidden = set() if args.no_hide else hidden
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.section:
        if args.hidden:
            hide_packages(args.hidden)
        sys.path.insert(0, str(ROOT))
        return run_section(args)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
