"""Train/eval step time and peak memory of every method against HF peft's twins, full
fine-tuning and the floor; and the epoch time of our data pipeline against padding to 128.

    python benchmarks/speed.py                      # MiniLM (embedded), batch 32, length 64
    python benchmarks/speed.py --backbone roberta-base-shaped --batch 16
    python benchmarks/speed.py --markdown docs/benchmarks.md

One process, identical batches, interleaved rounds (every config once per round, so drift in the
machine's speed hits all of them alike), medians over rounds. The floor is the frozen backbone
with gradients flowing back to its input embeddings and nothing trainable inside it: the least
work any PEFT method that must backpropagate through the backbone can do. Ratios < 1 are faster.

Peak memory of a train step (above the memory the built model already holds) is measured in a
fresh process per config, since a process's allocator keeps and reuses what earlier configs freed:
on CUDA `max_memory_allocated`, on CPU the resident set sampled every 0.5 ms during the step.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft_lightning.methods import METHODS  # noqa: E402
from peft_lightning.tasks.heads import ClassificationHead  # noqa: E402

BACKBONES = {
    "minilm": {"name_or_path": "embedded:minilm"},
    "roberta-base-shaped": {"config": dict(model_type="roberta", vocab_size=50265, hidden_size=768,
                                           num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                           max_position_embeddings=514, pad_token_id=1)},
}
P = 16
OURS = {  # name -> (method, knobs); peft twin name or None
    "ptuning_v2 (prefix, no reparam)": ("ptuning_v2", dict(reparameterization="none", prefix_dropout=0.0), "peft prefix"),
    "prefix_tuning (MLP)": ("prefix_tuning", dict(reparameterization="mlp", reparam_hidden=512), "peft prefix + MLP"),
    "prompt_tuning": ("prompt_tuning", dict(init="random"), "peft prompt tuning"),
    "p_tuning (LSTM)": ("p_tuning", dict(reparameterization="lstm", reparam_hidden=256), "peft P-tuning"),
    "ptuning_v2 + activation checkpointing": ("ptuning_v2", dict(reparameterization="none", prefix_dropout=0.0,
                                                               activation_checkpointing=True), "peft prefix"),
    "lora (r=8)": ("lora", dict(r=8, alpha=16, dropout=0.0), "peft LoRA"),
    "adapter (houlsby, 64)": ("adapter", dict(bottleneck=64), None),
    "bitfit": ("bitfit", dict(backbone_dropout=False), None),
    "finetune": ("finetune", dict(backbone_dropout=False), None),
}


def ours(method: str, knobs: dict, model: dict) -> nn.Module:
    cfg = dict(name=method, prefix_length=P, depth="deep", head={"dropout": 0.0}, **knobs)
    if method in ("prompt_tuning", "p_tuning"):
        cfg["depth"] = "embedding"
    return METHODS[method](model=model, method=cfg, num_labels=2)


class PeftTwin(nn.Module):
    """An HF peft model on the same backbone with our head on the first token (same head cost)."""

    def __init__(self, kind: str, model: dict):
        super().__init__()
        import peft
        from transformers import AutoConfig

        from peft_lightning.backbone import BackboneSpec, load_backbone

        base = load_backbone(BackboneSpec(**model))
        config: AutoConfig = base.config
        common = dict(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P)
        configs = {
            "peft prefix": peft.PrefixTuningConfig(**common, prefix_projection=False),
            "peft prefix + MLP": peft.PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=512),
            "peft prompt tuning": peft.PromptTuningConfig(**common),
            "peft P-tuning": peft.PromptEncoderConfig(**common, encoder_hidden_size=256),
            "peft LoRA": peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=8, lora_alpha=16, lora_dropout=0.0,
                                         target_modules=["query", "value"]),
        }
        self.model = peft.get_peft_model(base, configs[kind])
        self.head = ClassificationHead(config.hidden_size, 2, 0.0, "first")
        self.virtual = 0 if kind == "peft LoRA" or "prefix" in kind else P  # prompts prepend outputs

    def forward(self, batch):
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.head(hidden[:, self.virtual:], batch["attention_mask"])


class Floor(nn.Module):
    """The frozen backbone, gradients flowing to the input embeddings, nothing trainable inside."""

    def __init__(self, model: dict):
        super().__init__()
        from peft_lightning.backbone import BackboneSpec, load_backbone

        self.backbone = load_backbone(BackboneSpec(**model)).eval()
        self.head = ClassificationHead(self.backbone.config.hidden_size, 2, 0.0, "first")

    def forward(self, batch):
        embeds = self.backbone.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        return self.head(hidden, batch["attention_mask"])


def make_batch(vocab: int, batch: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab, 20000), (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask[torch.arange(length)[None] >= lengths[:, None]] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)}


AUTOCAST = {"enabled": False}  # --bf16: bfloat16 autocast around every forward


def _forward(model, batch):
    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=AUTOCAST["enabled"]):
        return model(batch).float()


def train_step(model, optimizer, batch):
    loss = nn.functional.cross_entropy(_forward(model, batch), batch["labels"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def eval_step(model, batch):
    _forward(model, batch)


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def build_config(name: str, model_spec: dict) -> nn.Module:
    if name == "floor":
        return Floor(model_spec)
    if name in OURS:
        method, knobs, _ = OURS[name]
        return ours(method, knobs, model_spec)
    return PeftTwin(name, model_spec)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_memory(name: str, model_spec: dict, batch_size: int, length: int) -> float:
    """MiB a train step needs above the built model (run in a fresh process: see the docstring)."""
    import threading

    torch.manual_seed(0)
    model = build_config(name, model_spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    batch = {k: v.to(device) for k, v in make_batch(_vocab(model), batch_size, length).items()}
    params = [p for p in model.parameters() if p.requires_grad] or [torch.zeros(1, requires_grad=True, device=device)]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    train_step(model, optimizer, batch)
    done.set()
    thread.join()
    return (max(peak[0], _rss()) - base) / 2**20


def _vocab(model: nn.Module) -> int:
    inner = getattr(model, "backbone", None) or model.model
    return inner.config.vocab_size


def memory_table(names: list[str], backbone: str, args) -> dict[str, float]:
    """Each config's step memory, each measured by a fresh `python speed.py --memory-of NAME`."""
    import subprocess

    out = {}
    for name in names:
        command = [sys.executable, __file__, "--memory-of", name, "--backbone", backbone,
                   "--batch", str(args.batch), "--length", str(args.length)] + (["--bf16"] if args.bf16 else [])
        result = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("MEMORY ")]
        out[name] = float(lines[-1].split()[1]) if lines else float("nan")
    return out


def pipeline_epoch(args) -> tuple[float, float, int]:
    """Seconds for one epoch over the first `--pipeline-examples` Rotten Tomatoes training sentences
    with P-Tuning v2 on MiniLM: our pipeline (per-batch padding, length-grouped batches) against
    padding every batch to 128 tokens in shuffled order (the official P-Tuning v2 code)."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from peft_lightning.data import TaskDataModule

    spec = BACKBONES["minilm"]
    model = ours("ptuning_v2", dict(reparameterization="none", prefix_dropout=0.0), spec)
    tokenizer = model.tokenizer
    dm = TaskDataModule(tokenizer, source="embedded:rotten_tomatoes", labels=["negative", "positive"],
                        batch_size=args.batch, seed=0)
    dm.setup()
    dm.data["train"] = dm.data["train"].select(range(args.pipeline_examples))
    dm.train_lengths = dm.train_lengths[:args.pipeline_examples]
    ours_loader = dm.train_dataloader()
    padded = DataLoader(dm.data["train"], batch_size=args.batch, shuffle=True,
                        collate_fn=DataCollatorWithPadding(tokenizer, padding="max_length", max_length=128))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    times = {"ours": [], "pad128": []}
    for _ in range(2):  # interleaved: ours, padded, ours, padded
        for name, loader in (("ours", ours_loader), ("pad128", padded)):
            start = time.perf_counter()
            for batch in loader:
                train_step(model, optimizer, batch)
            times[name].append(time.perf_counter() - start)
    return min(times["ours"]), min(times["pad128"]), args.pipeline_examples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=[*sorted(BACKBONES), "all"], default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per config per round")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--pipeline-examples", type=int, default=1024,
                        help="training sentences for the data-pipeline epoch comparison (0: skip it)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU; slow on most CPUs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every config before timing")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # (internal: one config's memory, in a fresh process)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    AUTOCAST["enabled"] = args.bf16
    if args.memory_of:
        print(f"MEMORY {step_memory(args.memory_of, BACKBONES[args.backbone], args.batch, args.length):.1f}")
        return 0
    lines = [f"{_machine()}; {date.today().isoformat()}. Command: `python benchmarks/speed.py "
             f"{' '.join(sys.argv[1:] if argv is None else argv)}`", ""]
    for backbone in sorted(BACKBONES) if args.backbone == "all" else [args.backbone]:
        lines += step_table(backbone, args) + [""]
        print("\n".join(lines), flush=True)
    if args.pipeline_examples:
        ours_s, padded_s, n = pipeline_epoch(args)
        lines += [f"Data pipeline, one epoch over {n} Rotten Tomatoes training sentences (P-Tuning v2 on MiniLM, "
                  f"batch {args.batch}, best of 2 interleaved): per-batch padding + length-grouped batches "
                  f"{ours_s:.1f} s, padding every batch to 128 tokens {padded_s:.1f} s: **{ours_s / padded_s:.2f}×**."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    return 0


def step_table(backbone: str, args) -> list[str]:
    """Markdown lines: every config's train/eval step time (interleaved rounds) and step memory."""
    model_spec = BACKBONES[backbone]
    configs: dict[str, nn.Module] = {"floor": Floor(model_spec)}
    for name, (method, knobs, twin) in OURS.items():
        configs[name] = ours(method, knobs, model_spec)
        if twin and twin not in configs:
            configs[twin] = PeftTwin(twin, model_spec)
    vocab = configs["floor"].backbone.config.vocab_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device) for k, v in make_batch(vocab, args.batch, args.length).items()}
    for name in configs:
        configs[name] = configs[name].to(device)
        if args.compile:
            configs[name].forward = torch.compile(configs[name].forward)
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad] or
                                       [torch.zeros(1, requires_grad=True)], lr=1e-5) for n, m in configs.items()}
    train_t = {n: [] for n in configs}
    eval_t = {n: [] for n in configs}
    for name, m in configs.items():  # warm-up
        m.train()
        train_step(m, optimizers[name], batch)
        m.eval()
        eval_step(m, batch)
    for _ in range(args.rounds):
        for name, m in configs.items():
            m.train()  # (our modules keep their frozen backbone in eval mode: see PeftClassifier.train)
            train_t[name].append(timed(lambda: train_step(m, optimizers[name], batch), args.steps))
            m.eval()
            eval_t[name].append(timed(lambda: eval_step(m, batch), args.steps))
    med = {n: (statistics.median(train_t[n]), statistics.median(eval_t[n])) for n in configs}
    del configs, optimizers
    memory = memory_table(list(med), backbone, args)
    floor_train, floor_eval = med["floor"]
    twin_of = {name: twin for name, (_, _, twin) in OURS.items()}
    lines = [
        f"Backbone {backbone}, batch {args.batch} x length {args.length} (random lengths {args.length // 2}.."
        f"{args.length}), {args.rounds} interleaved rounds x {args.steps} steps, medians.",
        "",
        "| config | train ms/step | × floor | × peft twin | eval ms/step | eval × floor | step memory MiB | "
        "memory × peft twin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (t, e) in med.items():
        twin = twin_of.get(name)
        vs_twin = f"{t / med[twin][0]:.2f}" if twin else ""
        mem_twin = f"{memory[name] / memory[twin]:.2f}" if twin and memory[twin] > 0 else ""
        lines.append(f"| {name} | {t * 1e3:.1f} | {t / floor_train:.2f} | {vs_twin} | {e * 1e3:.1f} | "
                     f"{e / floor_eval:.2f} | {memory[name]:.0f} | {mem_twin} |")
    return lines


def _machine() -> str:
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return (f"{device} ({platform.machine()}); torch {torch.__version__}, transformers {transformers.__version__}"
            + _peft_version())


def _peft_version() -> str:
    try:
        import peft

        return f", peft {peft.__version__}"
    except ImportError:
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
