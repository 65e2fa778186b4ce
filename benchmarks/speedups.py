"""Do the prefix speedups help? (issue 15, item 5: "kept where they help"). The deep prefix's train
and evaluation steps with the extended attention mask built once per forward (today) against the
path it replaced, the mask rebuilt in every layer (`tests/test_speedups.py`'s reference, which the
tests prove computes the same), on one model, in shuffled paired rounds.

    python benchmarks/speedups.py [--backbone minilm|roberta-base-shaped] [--rounds 20] [--smoke]

The key/value layout of the prefix table is not timed here: the replaced flat layout cannot be
rebuilt without a flat parameter, and both layouts are copied once per layer by the `torch.cat`
that joins prefix and real keys, so the layout saves one strided view per layer, not a copy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # (the replaced path lives beside the tests that check it)
from benchmarks.speed import (BACKBONES, TINY_ROBERTA, build, eval_step, machine, make_batch, median_iqr,  # noqa: E402
                              paired, rounds, set_mode, spread, train_step, verdict)
from peft_lightning.injection.prefix import PrefixState  # noqa: E402
from test_speedups import legacy_extended_mask  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=list(BACKBONES), default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="2 rounds, batch 4 x 16: the code path only")
    args = parser.parse_args(argv)
    spec = BACKBONES[args.backbone]
    if args.smoke:
        args.rounds, args.batch, args.length = 2, 4, 16
        spec = {"config": TINY_ROBERTA} if args.backbone == "roberta-base-shaped" else spec
    model = build("deep prefix (ptuning_v2)", spec)
    batch = make_batch(model.backbone.config.vocab_size, args.batch, args.length)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    current = PrefixState.extended_mask

    def arm(mask_fn, train: bool):
        def prepare():
            PrefixState.extended_mask = mask_fn
            if train:
                set_mode(model, False)
            else:
                model.eval()
        return prepare, ((lambda: train_step(model, optimizer, batch)) if train else (lambda: eval_step(model, batch)))

    entries = {(kind, path): arm(fn, kind == "train") for kind in ("train", "eval")
               for path, fn in (("once per forward", current), ("every layer", legacy_extended_mask))}
    try:
        for prepare, step in entries.values():  # warm-up
            prepare()
            step()
        times = rounds(entries, args.rounds, 1, "cpu", 0, "speedups")
    finally:
        PrefixState.extended_mask = current
    layers = model.backbone.config.num_hidden_layers
    print(f"Deep prefix (P-Tuning v2, P = 16), {args.backbone}{' (smoke: not results)' if args.smoke else ''}, "
          f"{layers} layers, batch {args.batch} x {args.length} (right padding), dropout off, fp32; {args.rounds} "
          f"rounds, order shuffled each round, ratios paired per round, median [IQR]; {machine()}.\n")
    print("| step | mask once per forward, ms | mask in every layer, ms | once / every layer | verdict |")
    print("|---|---|---|---|---|")
    for kind in ("train", "eval"):
        a, b = times[kind, "once per forward"], times[kind, "every layer"]
        r = paired(a, b)
        print(f"| {kind} | {spread(tuple(x * 1e3 for x in median_iqr(a)), 1)} | "
              f"{spread(tuple(x * 1e3 for x in median_iqr(b)), 1)} | {spread(r, 3)} | {verdict(r)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
