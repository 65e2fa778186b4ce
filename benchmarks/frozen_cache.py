"""Epoch time with the frozen-layer cache (issue 15, item 6): P-Tuning v2 with prompts in the top half
of MiniLM's layers (`method.depth=[3,4,5]`), cached (`cache_frozen_layers=true`) against uncached,
the same rows in the same per-epoch orders, backbone dropout off (the cache's condition).

    python benchmarks/frozen_cache.py [--rows 512] [--epochs 6] [--smoke]

Each epoch reshuffles the rows into new batches of 32 (as a DataLoader with shuffle does), so a
batch is served from the cache only once every row in it has been seen. Epoch 1 fills the cache
(its time is the uncached one plus the stores); from epoch 2 on, only layers 3-5 run. The two arms
alternate epoch by epoch (cached, uncached, cached, ...) so a slow stretch of the machine hits both;
the losses of every step are compared: the cache must not change them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.speed import BACKBONES, _forward, machine, ours, set_mode  # noqa: E402


def rows(n: int, vocab: int, length: int, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """n examples: random tokens (no special ids) of lengths length/2..length, and a label."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    return [(torch.randint(1000, min(vocab, 20000), (int(k),), generator=g), int(torch.randint(0, 2, (1,), generator=g)))
            for k in lengths]


def batches(data, order: list[int], size: int) -> list[dict]:
    """Right-padded batches of `size` in `order`, padded to the batch's longest row."""
    out = []
    for start in range(0, len(order), size):
        chunk = [data[i] for i in order[start:start + size]]
        width = max(len(t) for t, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (tokens, _) in enumerate(chunk):
            ids[r, :len(tokens)], mask[r, :len(tokens)] = tokens, 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in chunk])})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=6)  # (epochs 2-6: five paired ratios for a spread)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="64 rows, 2 epochs: the code path only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.epochs = 64, 2
    arms = {}
    for cached in (True, False):
        torch.manual_seed(0)  # the same prefix and head in both arms
        model = ours("ptuning_v2", dict(depth=[3, 4, 5], prefix_dropout=0.0, cache_frozen_layers=cached),
                     BACKBONES["minilm"])
        set_mode(model, False)
        arms[cached] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    data = rows(args.rows, arms[True][0].backbone.config.vocab_size, 64)
    seconds = {True: [], False: []}
    losses = {True: [], False: []}
    for epoch in range(args.epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)).tolist()
        for cached in (True, False) if epoch % 2 == 0 else (False, True):
            model, optimizer = arms[cached]
            start = time.perf_counter()
            for batch in batches(data, order, args.batch):
                loss = torch.nn.functional.cross_entropy(_forward(model, batch), batch["labels"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses[cached].append(loss.item())
            seconds[cached].append(time.perf_counter() - start)
    worst = max(abs(a - b) for a, b in zip(losses[True], losses[False]))
    print(f"Frozen-layer cache: P-Tuning v2, `method.depth=[3,4,5]`, MiniLM, {args.rows} rows (random tokens, "
          f"lengths 32..64), batches of {args.batch} reshuffled every epoch, backbone dropout off, fp32; "
          f"{machine()}.\n")
    print("| epoch | uncached s | cached s | cached / uncached |\n|---|---|---|---|")
    for e, (c, u) in enumerate(zip(seconds[True], seconds[False]), 1):
        print(f"| {e} | {u:.2f} | {c:.2f} | {c / u:.2f} |")
    later = [c / u for c, u in zip(seconds[True][1:], seconds[False][1:])]
    if later:
        q = statistics.quantiles(later, n=4, method="inclusive") if len(later) > 1 else [later[0]] * 3
        print(f"\nFrom epoch 2 on ({len(later)} epochs, each paired with the uncached epoch beside it): "
              f"**{statistics.median(later):.2f}x** [{q[0]:.2f}-{q[2]:.2f}] the uncached epoch, median [IQR] "
              f"(target <= 0.6; the layer-count estimate of the floor: 6 layers forward + 3 backward uncached, 3 + 3 "
              f"cached, a frozen layer's backward about one forward: 6/9 = 0.67). Largest difference between "
              f"the two arms' {len(losses[True])} step losses: {worst:.1e}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
