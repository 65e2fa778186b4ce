"""Prompt ensembling (Lester et al.): several trained prefixes of one task, every one run on every
test example in one forward pass per batch, against each prefix alone.

    python benchmarks/ensemble.py RUN1/adapter RUN2/adapter RUN3/adapter [--data rotten_tomatoes]
    python benchmarks/ensemble.py outputs/seeds/multiruns/<time>/*/adapter --markdown docs/ensemble.md

Prints test accuracy of each member, of the mean of their probabilities and of the majority vote.
The adapters must be deep prefixes (ptuning_v2 / prefix_tuning) trained on the same data config.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.speed import _machine  # noqa: E402
from peft_lightning.data import TaskDataModule  # noqa: E402
from peft_lightning.serving import MultiTaskModel, ensemble  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+", type=Path)
    parser.add_argument("--data", default="rotten_tomatoes", help="a conf/data config (its test split is used)")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    members = {f"m{i}:{p.parent.name}": p for i, p in enumerate(args.adapters)}
    model = MultiTaskModel(members)
    first = next(iter(members.values()))
    from peft_lightning.checkpoint import load_pretrained

    tokenizer = load_pretrained(first).tokenizer
    data = yaml.safe_load((CONF / f"{args.data}.yaml").read_text())
    dm = TaskDataModule(tokenizer, **{k: v for k, v in data.items() if k != "name"})
    dm.setup()
    loader = dm.test_dataloader() if args.split == "test" else dm.val_dataloader()
    names = list(members)
    correct = {n: 0 for n in [*names, "mean of probabilities", "majority vote"]}
    total = 0
    for batch in loader:
        labels = batch.pop("labels")
        out = ensemble(model, batch, names)
        for i, name in enumerate(names):
            correct[name] += int((out["members"][i].argmax(-1) == labels).sum())
        correct["mean of probabilities"] += int((out["mean"].argmax(-1) == labels).sum())
        correct["majority vote"] += int((out["vote"] == labels).sum())
        total += len(labels)
    accuracy = {n: c / total for n, c in correct.items()}
    singles = [accuracy[n] for n in names]
    lines = [f"Prompt ensembling on {args.data} ({args.split}, {total} examples), {len(names)} members, one forward "
             f"pass per batch. {_machine()}.", "",
             "| prompt | accuracy |", "|---|---|"]
    lines += [f"| {n.split(':', 1)[1]} ({members[n]}) | {accuracy[n]:.4f} |" for n in names]
    lines += [f"| single prompts: mean | {sum(singles) / len(singles):.4f} |",
              f"| single prompts: best | {max(singles):.4f} |",
              f"| **ensemble: mean of probabilities** | **{accuracy['mean of probabilities']:.4f}** |",
              f"| **ensemble: majority vote** | **{accuracy['majority vote']:.4f}** |"]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    with torch.no_grad():
        raise SystemExit(main())
