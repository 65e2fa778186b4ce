"""Serving throughput: batches that mix tasks (each example with its own task's prefix) and
batches of one task through MultiTaskModel, against the plain single-task model (the task's own
module: no server, no per-row gather), on one frozen backbone.

    python benchmarks/mixed_tasks.py [--tasks 4] [--batch 32] [--length 64] [--rounds 20]
    python benchmarks/mixed_tasks.py --smoke      # the code paths on a tiny batch, 2 rounds

Builds K randomly initialised P-Tuning v2 adapters on the embedded MiniLM (their values do not
matter for speed), and times one evaluation forward pass per arm per round, in an order shuffled
each round (seeded): the plain model of task 0; the server on a batch of task 0 (its fast path:
one broadcast prefix); the server on a batch whose examples cycle through the K tasks (a
per-row gather of prefixes, a prefix mask). Reports examples/s (median [IQR]) and each arm's time
per batch against the plain model's, paired per round (median [IQR]; parity when the IQR spans
1.0 or the median is within 2% of it: speed.verdict), and checks the server's single-task logits against the plain model's.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.speed import machine, make_batch, median_iqr, ours, paired, rounds, spread, verdict  # noqa: E402
from peft_lightning.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from peft_lightning.serving import MultiTaskModel  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seeds the shuffled order of every round")
    parser.add_argument("--smoke", action="store_true", help="2 rounds, batch 4 x 16: the code paths, not results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.batch, args.length = 2, 4, 16
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {}
        for k in range(args.tasks):
            m = ours("ptuning_v2", {}, {"name_or_path": "embedded:minilm"})
            adapters[f"task{k}"] = save_pretrained(m, Path(tmp) / f"task{k}")
            del m
        server = MultiTaskModel(adapters).eval()
        plain = load_pretrained(adapters["task0"]).eval()
    batch = make_batch(server.backbone.config.vocab_size, args.batch, args.length)
    tasks = {"single": ["task0"] * args.batch, "mixed": [f"task{i % args.tasks}" for i in range(args.batch)]}
    with torch.no_grad():
        gap = (torch.stack(server(batch, tasks["single"])) - plain(batch)).abs().max().item()
    idle = lambda: None  # noqa: E731 - every arm is already in eval mode
    arms = {"plain": (idle, torch.no_grad()(lambda: plain(batch))),
            "single": (idle, lambda: server(batch, tasks["single"])),
            "mixed": (idle, lambda: server(batch, tasks["mixed"]))}
    for _, run in arms.values():  # warm-up
        run()
    times = rounds(arms, args.rounds, 1, "cpu", args.seed, "mixed tasks")
    names = {"plain": "plain single-task model (task 0's own module)", "single": "server, one-task batch (fast path)",
             "mixed": f"server, mixed batch ({args.tasks} tasks, per-row prefixes)"}
    rows = []
    for arm, label in names.items():
        rate = median_iqr([args.batch / t for t in times[arm]])
        ratio = paired(times[arm], times["plain"])  # time per batch, arm / plain
        rows.append(f"| {label} | {spread(rate, 1)} | {spread(ratio, 3) if arm != 'plain' else ''} | "
                    f"{verdict(ratio) if arm != 'plain' else ''} |")
    print(f"{'(smoke: tiny shapes, not results) ' if args.smoke else ''}{args.tasks} P-Tuning v2 tasks (prefix 16) on "
          f"MiniLM, batch {args.batch} x length {args.length}, evaluation forward passes, {args.rounds} rounds in an "
          f"order shuffled each round (seed {args.seed}); {machine()}. The server's one-task logits equal the plain "
          f"model's to {gap:.1e}.\n")
    print("| arm | examples/s, median [IQR] | time per batch x plain model, paired | verdict |\n|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
