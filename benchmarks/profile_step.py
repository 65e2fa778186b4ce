"""Where a train step's time goes, for the configs below 80% of the matmul peak in speed.py's table:
the top aten ops of one step (torch.profiler, self CPU time) and the share in matmuls and attention.

    python benchmarks/profile_step.py                       # floor, LoRA, (IA)^3, DoRA, fine-tuning
    python benchmarks/profile_step.py --configs "LoRA r=8"  # names as in speed.py's tables

Same batch, threads and dropout mode (off) as speed.py's MiniLM table; 2 warm-up steps, 2 profiled.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.speed import BACKBONES, build, make_batch, set_mode, train_step  # noqa: E402

DENSE = ("aten::mm", "aten::addmm", "aten::bmm", "flash_attention", "scaled_dot_product")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["floor", "LoRA r=8", "(IA)^3", "DoRA r=8", "fine-tuning"])
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="batch 4 x 16: the code path only, not results")
    args = parser.parse_args(argv)
    shape = (4, 16) if args.smoke else (32, 64)
    print("```")  # (a results file quotes it as it is printed)
    for name in args.configs:
        model = build(name, BACKBONES["minilm"])
        set_mode(model, False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batch = make_batch(model.backbone.config.vocab_size, *shape)
        for _ in range(2):
            train_step(model, optimizer, batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                train_step(model, optimizer, batch)
        ops = prof.key_averages()
        total = sum(op.self_cpu_time_total for op in ops)
        dense = sum(op.self_cpu_time_total for op in ops if any(s in op.key for s in DENSE))
        print(f"{name}: {total / 2e3:.0f} ms/step (self CPU time), matmuls and attention {dense / total:.0%}")
        for op in sorted(ops, key=lambda op: -op.self_cpu_time_total)[:args.top]:
            print(f"    {op.key:58s} {op.self_cpu_time_total / 2e3:7.1f} ms  {op.count // 2:4d} calls/step")
    print("```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
