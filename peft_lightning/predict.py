"""Label new text with a saved adapter (a few KB or MB) on its frozen backbone.

    python -m peft_lightning.predict outputs/train/runs/<time>/adapter --input reviews.txt
    echo "a gorgeous, witty film" | python -m peft_lightning.predict <adapter>

Input: one example per line, plain text or JSON with a "text" field. Output: one JSON line per
example, in input order, with the label, its probability and every label's probability.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.progress import track

from peft_lightning.backbone import BackboneSpec, load_tokenizer
from peft_lightning.checkpoint import load_pretrained


@torch.no_grad()
def predict_texts(module, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128,
                  progress: bool = False) -> torch.Tensor:
    """Class probabilities (len(texts), num_labels), batched with padding to each batch's longest."""
    module.eval()
    out = []
    batches = range(0, len(texts), batch_size)
    if progress:
        batches = track(batches, description="predicting", total=len(batches), console=_stderr_console())
    for start in batches:
        enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        batch = {k: v.to(module.device) for k, v in enc.items()}
        out.append(torch.softmax(module(batch).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, module.hparams.num_labels)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def read_examples(lines) -> list[str]:
    texts = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"input line {number}: looks like JSON but does not parse ({err})") from err
            if "text" not in record:
                raise ValueError(f"input line {number}: JSON without a \"text\" field (fields: {sorted(record)})")
            texts.append(str(record["text"]))
        else:
            texts.append(line)
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_lightning.predict", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="an adapter directory (adapter_config.json + safetensors)")
    parser.add_argument("--input", default="-", help="text file, one example per line (default: stdin)")
    parser.add_argument("--output", default="-", help="JSON-lines file to write (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        module = load_pretrained(args.adapter)
        if args.input == "-":
            texts = read_examples(sys.stdin)
        else:
            with open(args.input, encoding="utf-8") as f:
                texts = read_examples(f)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(BackboneSpec(**module.hparams.model))
    probs = predict_texts(module, tokenizer, texts, args.batch_size, args.max_length, progress=len(texts) > args.batch_size)
    labels = module.hparams.labels or [str(i) for i in range(probs.shape[1])]
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        for text, p in zip(texts, probs.tolist()):
            best = max(range(len(p)), key=p.__getitem__)
            out.write(json.dumps({"text": text, "label": labels[best], "probability": round(p[best], 6),
                                  "probabilities": {lab: round(v, 6) for lab, v in zip(labels, p)}}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
