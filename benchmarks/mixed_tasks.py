"""Throughput of mixed-task batches (each example with its own task's prefix) against
single-task batches of the same size, on one frozen backbone.

    python benchmarks/mixed_tasks.py [--tasks 4] [--batch 32] [--length 64]

Builds K randomly initialised P-Tuning v2 adapters on the embedded MiniLM (their values do not
matter for speed), serves them with MultiTaskModel, and times, interleaved over rounds (medians):
a batch whose examples cycle through the K tasks, and a batch of one task.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.speed import _machine, make_batch  # noqa: E402
from peft_lightning.checkpoint import save_pretrained  # noqa: E402
from peft_lightning.methods import METHODS  # noqa: E402
from peft_lightning.serving import MultiTaskModel  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {}
        for k in range(args.tasks):
            m = METHODS["ptuning_v2"](model={"name_or_path": "embedded:minilm"},
                                      method={"name": "ptuning_v2", "prefix_length": 16}, num_labels=2 + k % 2)
            adapters[f"task{k}"] = save_pretrained(m, Path(tmp) / f"task{k}")
            del m
        model = MultiTaskModel(adapters)
    batch = make_batch(model.backbone.config.vocab_size, args.batch, args.length)
    mixed = [f"task{i % args.tasks}" for i in range(args.batch)]
    single = ["task0"] * args.batch
    times = {"mixed": [], "single": []}
    model(batch, mixed), model(batch, single)  # warm-up
    for _ in range(args.rounds):
        for name, tasks in (("mixed", mixed), ("single", single)):
            start = time.perf_counter()
            model(batch, tasks)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.tasks} tasks, batch {args.batch} x length {args.length}, {args.rounds} interleaved rounds, "
          f"medians; {_machine()}")
    print("| batch | examples/s | × single-task |\n|---|---|---|")
    for name in ("single", "mixed"):
        print(f"| {name}-task | {args.batch / med[name]:.1f} | {med['single'] / med[name]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
