"""Independent mode-matched check of the committed benchmark's verdicts (issue 15).

    HF_HUB_OFFLINE=1 python benchmarks/independent_check.py --out /tmp/check.md   # <= 12 min on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/independent_check.py --smoke --out /tmp/s.md  # code paths only

Written apart from benchmarks/speed.py (nothing is imported from it) so that a shared mistake
cannot make both agree. Our methods are built as train.py builds them: a Hydra config composed
from conf/ with command-line overrides, then peft_lightning.run.build(). The peft twins come
from peft's own configs on a freshly loaded copy of the same backbone, with a linear head on the
first real token; the floor is the frozen backbone with the gradient flowing back to its input
embeddings and the same head. Everything trains with cross entropy and AdamW.

Modes, matched on both sides: "off" = every backbone in eval mode (ours with
method.backbone_dropout=false, the floor and twins .eval()), "on" = every backbone in train mode
(ours with method.backbone_dropout=true, the floor and twins .train()). Method-level dropouts
(prefix, LoRA, head) are 0 everywhere. Before timing, the active nn.Dropout modules (training,
p > 0) are counted on every model and must be 0 in "off" and equal across configs in "on"; the
attention aten ops of one step are recorded too (which SDPA kernel ran).

Timing: a full train step (forward, loss, backward, AdamW step, zero_grad), 2 warm-up steps per
(config, mode), then rounds; every round times each (config, mode) once, in an order shuffled
each round. Ratios are paired per round (ours / twin, ours / floor, same mode, same round);
median and IQR over rounds; "parity" when the IQR spans 1.0, else faster / slower. FLOPs per step
by torch.utils.flop_counter.FlopCounterMode as it is (no formulas added: the CPU flash-attention
kernel counts 0, so the dropout-off figures leave out attention's matmuls).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

P = 16
MODES = ("off", "on")
# ours: label -> (Hydra overrides of the method group, its peft twin)
OURS = {
    "ours deep prefix (ptuning_v2)": (["method=ptuning_v2", "method.reparameterization=none",
                                       "method.prefix_dropout=0.0", "method.init=random"], "peft prefix"),
    "ours prefix + MLP 512 (prefix_tuning)": (["method=prefix_tuning", "method.reparameterization=mlp",
                                               "method.reparam_hidden=512", "method.prefix_dropout=0.0",
                                               "method.init=random"], "peft prefix + MLP 512"),
    "ours LoRA r=8": (["method=lora", "method.r=8", "method.alpha=16", "method.dropout=0.0"], "peft LoRA r=8"),
    "ours prompt tuning": (["method=prompt_tuning", "method.reparameterization=none", "method.init=random"],
                           "peft prompt tuning"),
}
TWINS = ("peft prefix", "peft prefix + MLP 512", "peft LoRA r=8", "peft prompt tuning")
FLOOR = "floor"


# --- building -------------------------------------------------------------------------------------

def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=["logger=none", "model=minilm", "data=rotten_tomatoes", *overrides])


def build_ours(overrides: list[str], dropout: bool):
    """(datamodule, module) from a composed config, as train.py's run.build does it."""
    from peft_lightning.run import build

    if any(o.startswith("method=") and o.split("=")[1] in ("ptuning_v2", "prefix_tuning", "prompt_tuning")
           for o in overrides):
        overrides = [*overrides, f"method.prefix_length={P}"]
    cfg = compose([*overrides, "method.head.dropout=0.0", "method.head.pooling=first",
                   f"method.backbone_dropout={str(dropout).lower()}"])
    torch.manual_seed(0)
    return build(cfg)


def model_spec() -> dict:
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(compose([]).model, resolve=True)
    spec.pop("name", None)
    return spec


def fresh_backbone():
    from peft_lightning.backbone import BackboneSpec, load_backbone

    return load_backbone(BackboneSpec(**model_spec()))


class Floor(nn.Module):
    """Frozen backbone, nothing trainable inside it; the gradient flows back to the input embeddings."""

    def __init__(self):
        super().__init__()
        self.backbone = fresh_backbone().requires_grad_(False)
        self.head = nn.Linear(self.backbone.config.hidden_size, 2)

    def forward(self, batch):
        embeds = self.backbone.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        return self.head(hidden[:, 0])


class Twin(nn.Module):
    """peft's model on the same backbone; a linear head on the first real token."""

    def __init__(self, kind: str):
        super().__init__()
        import peft

        common = dict(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P)
        config = {
            "peft prefix": lambda: peft.PrefixTuningConfig(**common, prefix_projection=False),
            "peft prefix + MLP 512": lambda: peft.PrefixTuningConfig(**common, prefix_projection=True,
                                                                     encoder_hidden_size=512),
            "peft LoRA r=8": lambda: peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=8, lora_alpha=16,
                                                     lora_dropout=0.0, target_modules=["query", "value"]),
            "peft prompt tuning": lambda: peft.PromptTuningConfig(**common),
        }[kind]()
        backbone = fresh_backbone()
        self.model = peft.get_peft_model(backbone, config)
        self.head = nn.Linear(backbone.config.hidden_size, 2)
        self.skip = P if kind == "peft prompt tuning" else 0  # peft puts the soft prompt in front

    def forward(self, batch):
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.head(hidden[:, self.skip])


def real_batch(datamodule, tokenizer, batch: int, length: int, seed: int = 0) -> dict:
    """`batch` Rotten Tomatoes training sentences whose token count is in length/2..length, drawn
    with a fixed seed, right-padded to `length`, with their labels."""
    datamodule.setup()
    train = datamodule.data["train"]
    fits = [i for i, ids in enumerate(train["input_ids"]) if length // 2 <= len(ids) <= length]
    if len(fits) < batch:
        raise SystemExit(f"only {len(fits)} training sentences have {length // 2}..{length} tokens")
    chosen = random.Random(seed).sample(fits, batch)
    ids = torch.full((batch, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    label_key = "labels" if "labels" in train.column_names else "label"
    labels = []
    for row, i in enumerate(chosen):
        seq = train[i]["input_ids"]
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels.append(int(train[i][label_key]))
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}


# --- modes, work --------------------------------------------------------------------------------

def active_dropouts(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0)


def set_mode(name: str, model: nn.Module, mode: str) -> None:
    if name.startswith("ours"):
        model.train()  # built for its mode: PeftClassifier.train applies method.backbone_dropout
    else:
        model.train(mode == "on")  # (method-level dropouts are 0, so eval mode only turns the backbone's off)


class AttentionOps(TorchDispatchMode):
    """Counts the attention-kernel aten ops a step dispatches."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "scaled_dot_product" in name or name in ("_softmax", "_safe_softmax", "_softmax_backward_data"):
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def short_ops(ops: dict[str, int]) -> str:
    fwd = {k: v for k, v in ops.items() if "backward" not in k}
    if not fwd:
        return "-"
    return ", ".join(f"{k.replace('_scaled_dot_product_', 'sdpa_')} x{v}" for k, v in sorted(fwd.items()))


def train_step(model, optimizer, batch) -> None:
    loss = nn.functional.cross_entropy(model(batch), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def median_iqr(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q1, q3


def verdict(r: tuple[float, float, float]) -> str:
    return "parity" if r[1] <= 1.0 <= r[2] else ("faster" if r[0] < 1.0 else "slower")


def fmt(r: tuple[float, float, float], scale: float = 1.0, digits: int = 3) -> str:
    return f"{r[0] * scale:.{digits}f} [{r[1] * scale:.{digits}f}-{r[2] * scale:.{digits}f}]"


def machine() -> str:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# --- main ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="markdown output file")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20, help="at most this many rounds")
    ap.add_argument("--min-rounds", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=660, help="no new round once it would end past this (wall)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="2 rounds, batch 4 x 16: code paths only, not results")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds = args.min_rounds = 2
        args.batch, args.length = 4, 16
    torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), loadavg()
    started_at = datetime.now(timezone.utc)

    # models: ours built per mode from its config, the floor and twins once (their mode is .train/.eval)
    models: dict[tuple[str, str], nn.Module] = {}
    datamodule = tokenizer = None
    for name, (overrides, _) in OURS.items():
        for mode in MODES:
            dm, module = build_ours(overrides, mode == "on")
            models[name, mode] = module
            if datamodule is None:
                datamodule, tokenizer = dm, module.tokenizer
    torch.manual_seed(0)
    shared = {FLOOR: Floor(), **{t: Twin(t) for t in TWINS}}
    for name, model in shared.items():
        for mode in MODES:
            models[name, mode] = model
    batch = real_batch(datamodule, tokenizer, args.batch, args.length, args.seed)
    optim = {}
    for key, m in models.items():
        if id(m) not in optim:
            optim[id(m)] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    trainable = {key[0]: sum(p.numel() for p in m.parameters() if p.requires_grad) for key, m in models.items()}
    log(f"built {len(set(map(id, models.values())))} models in {time.perf_counter() - start:.0f} s; batch "
        f"{tuple(batch['input_ids'].shape)}, real lengths {batch['attention_mask'].sum(1).min().item()}.."
        f"{batch['attention_mask'].sum(1).max().item()}")

    def step(key):
        name, mode = key
        set_mode(name, models[key], mode)
        train_step(models[key], optim[id(models[key])], batch)

    # mode check, warm-up, FLOPs and attention ops
    dropouts, flops, attn = {}, {}, {}
    for key in models:
        set_mode(key[0], models[key], key[1])
        dropouts[key] = active_dropouts(models[key])
    for mode in MODES:
        counts = {k[0]: v for k, v in dropouts.items() if k[1] == mode}
        if mode == "off" and any(counts.values()):
            raise SystemExit(f"dropout off but active dropouts: {counts}")
        if mode == "on" and (len(set(counts.values())) != 1 or not next(iter(counts.values()))):
            raise SystemExit(f"dropout on but unequal active dropouts: {counts}")
    for key in models:
        for _ in range(2):
            step(key)
        set_mode(key[0], models[key], key[1])
        counter, ops = FlopCounterMode(display=False), AttentionOps()
        try:
            with counter, ops:
                train_step(models[key], optim[id(models[key])], batch)
            flops[key] = counter.get_total_flops()
        except Exception as err:  # (report it, do not hide the config)
            flops[key] = float("nan")
            log(f"FlopCounterMode failed on {key}: {err!r}")
        attn[key] = short_ops(ops.ops)
    log(f"warm-up + FLOP pass done at {time.perf_counter() - start:.0f} s")

    # rounds
    rng = random.Random(args.seed)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in models}
    rounds_done, round_s = 0, []
    while rounds_done < args.rounds:
        t_round = time.perf_counter()
        order = list(models)
        rng.shuffle(order)
        for key in order:
            set_mode(key[0], models[key], key[1])
            assert active_dropouts(models[key]) == dropouts[key]
            gc.collect()
            t0 = time.perf_counter()
            train_step(models[key], optim[id(models[key])], batch)
            times[key].append(time.perf_counter() - t0)
        rounds_done += 1
        round_s.append(time.perf_counter() - t_round)
        elapsed = time.perf_counter() - start
        log(f"round {rounds_done}: {round_s[-1]:.0f} s (elapsed {elapsed:.0f} s)")
        if rounds_done >= args.min_rounds and elapsed + max(round_s) > args.budget_s:
            break
    load_after = loadavg()

    def paired(a, b):
        return median_iqr([x / y for x, y in zip(times[a], times[b])])

    lines = [f"# Independent mode-matched check{' (SMOKE: not results)' if args.smoke else ''}", "",
             f"`python benchmarks/independent_check.py{' --smoke' if args.smoke else ''}` "
             f"(nothing imported from benchmarks/speed.py), {started_at:%Y-%m-%d %H:%M} UTC, "
             f"{(time.perf_counter() - start) / 60:.1f} min.",
             f"Machine: {machine()}.",
             f"Load average (1, 5, 15 min) before: {load_before}; after: {load_after}.", "",
             f"MiniLM (`embedded:minilm`, sdpa), fp32, batch {args.batch} x {args.length} tokens: Rotten Tomatoes "
             f"training sentences with {args.length // 2}..{args.length} tokens, right padding. Train step = "
             f"forward, cross entropy, backward, AdamW step. 2 warm-up steps per (config, mode), then "
             f"{rounds_done} rounds, each timing every (config, mode) once in a freshly shuffled order (seed "
             f"{args.seed}). Times and ratios: median [IQR] over rounds; ratios paired per round. Verdict: parity "
             f"when the ratio's IQR spans 1.0. GFLOP: FlopCounterMode as is (it counts 0 for the CPU flash-attention "
             f"kernel, so dropout-off rows omit attention's matmuls; dropout-on rows use the math kernel, counted "
             f"as bmm).", ""]
    for mode in MODES:
        lines += [f"**Dropout {mode}** (every backbone in {'eval' if mode == 'off' else 'train'} mode)", "",
                  "| config | active dropouts | attention ops (fwd) | trainable | ms/step | GFLOP/step | x floor | "
                  "verdict vs floor |", "|---|---|---|---|---|---|---|---|"]
        for name in [FLOOR, *[n for o in OURS for n in (o, OURS[o][1])]]:
            key = (name, mode)
            vs = paired(key, (FLOOR, mode)) if name != FLOOR else None
            lines.append(f"| {name} | {dropouts[key]} | {attn[key]} | {trainable[name]:,} | "
                         f"{fmt(median_iqr(times[key]), 1e3, 0)} | {flops[key] / 1e9:.2f} | "
                         f"{fmt(vs) if vs else ''} | {verdict(vs) if vs else ''} |")
        lines.append("")
    lines += ["**Paired ratios**", "", "| mode | ours | twin | trainable ours / twin | GFLOP ours / twin | "
              "ours / twin | verdict | ours / floor | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        for name, (_, twin) in OURS.items():
            a, b, f = (name, mode), (twin, mode), (FLOOR, mode)
            rt, rf = paired(a, b), paired(a, f)
            lines.append(f"| {mode} | {name} | {twin} | {trainable[name]:,} / {trainable[twin]:,} | "
                         f"{flops[a] / 1e9:.2f} / {flops[b] / 1e9:.2f} | {fmt(rt)} | **{verdict(rt)}** | {fmt(rf)} | "
                         f"**{verdict(rf)}** |")
    r = paired((FLOOR, "off"), (FLOOR, "on"))
    lines += ["", f"Floor, dropout off / dropout on (same model, paired per round): {fmt(r)} ({verdict(r)}).", ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
