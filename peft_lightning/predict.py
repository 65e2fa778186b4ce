"""Label new text with a saved adapter (a few KB or MB) on its frozen backbone.

    python -m peft_lightning.predict outputs/train/runs/<time>/adapter --input reviews.txt
    echo "a gorgeous, witty film" | python -m peft_lightning.predict <adapter>

Input: one example per line, plain text or JSON with the task's fields ("text", and "text_pair",
"choices" or "tokens" where the task has them). Output: one JSON line per example, in input order:
classification the label, its probability and every label's; regression the score; multiple
choice the chosen index and probabilities; token classification the tags and entity spans;
generation the generated text.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from rich.progress import track

from peft_lightning.checkpoint import load_pretrained
from peft_lightning.errors import DataError, DataFileNotFound, UserError


@torch.no_grad()
def predict_records(module, records: list[dict], batch_size: int = 64, max_length: int = 128,
                    progress: bool = False) -> list[dict]:
    """Predictions for any task type, batched through the task's own tokenization and collator.
    Each record is encoded on its own terms: a batch may mix records with and without an optional
    field (`text_pair`), and each gives what it gives when predicted alone."""
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
    module.eval()
    task, tokenizer = module.task, module.tokenizer
    out: list[dict] = []
    batches = range(0, len(records), batch_size)
    if progress:
        batches = track(batches, description="predicting", total=len(batches), console=_stderr_console())
    collate = task.collator(tokenizer)
    for start in batches:
        chunk = records[start:start + batch_size]
        batch = collate(encode_records(task, tokenizer, chunk, max_length))
        batch = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out.extend(_describe(module, task, chunk, batch))
    return out


def encode_records(task, tokenizer, records: list[dict], max_length: int) -> list[dict]:
    """One feature dict per record, in order. Records are tokenized in groups of those that carry
    the same roles (a null value counts as absent), so a pair is never dropped, nor invented,
    because of its neighbours in the batch."""
    roles = [r for r in (*task.roles, *task.optional_roles) if r not in ("label", "target")]
    dummy = {"Regression": 0.0, "TokenClassification": None, "Generation": None}.get(type(task).__name__, 0)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(tuple(r for r in roles if rec.get(r) is not None), []).append(i)
    features: list[dict] = [{}] * len(records)
    for present, members in groups.items():
        group = [records[i] for i in members]
        rows = {r: [rec[r] for rec in group] for r in present}
        # placeholder labels: token classification's mark each word's first sub-token
        rows["label"] = [[0] * len(rec.get("tokens", [])) if dummy is None else dummy for rec in group]
        rows["target"] = [""] * len(group)
        enc = task.tokenize(rows, tokenizer, max_length)
        for j, i in enumerate(members):
            features[i] = {k: enc[k][j] for k in enc}
    return features


def _describe(module, task, chunk, batch) -> list[dict]:
    kind = type(task).__name__
    if kind == "Generation":
        return [{**rec, "generated": text} for rec, text in zip(chunk, task.generate(module, batch))]
    logits = module(batch).float().cpu()
    if kind == "Regression":
        return [{**rec, "score": round(v, 6)} for rec, v in zip(chunk, logits.tolist())]
    if kind == "TokenClassification":
        from seqeval.metrics.sequence_labeling import get_entities

        results = []
        for rec, row, labels in zip(chunk, logits.argmax(-1), batch["labels"].cpu()):
            tags = [task.labels[i] for i in row[labels != -100].tolist()]
            spans = [{"type": t, "start": a, "end": b + 1, "text": " ".join(rec["tokens"][a:b + 1])}
                     for t, a, b in get_entities(tags)]
            results.append({**rec, "tags": tags, "entities": spans})
        return results
    probs = torch.softmax(logits, dim=-1)
    names = task.labels if kind == "Classification" else [str(i) for i in range(probs.shape[1])]
    results = []
    for rec, p in zip(chunk, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        results.append({**rec, "label": names[best], "probability": round(p[best], 6),
                        "probabilities": {n: round(v, 6) for n, v in zip(names, p)}})
    return results


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def read_records(lines, source: str = "input", needed: tuple[str, ...] = ("text",), optional: tuple[str, ...] = ()
                 ) -> list[dict]:
    """Plain text lines become {"text": line}; JSON lines are taken as they are (objects only),
    and must hold the `needed` fields (null counts as missing)."""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{source}, line {number}: looks like JSON but does not parse ({err})") from None
            if not isinstance(record, dict):
                raise DataError(f"{source}, line {number}: a JSON line must be an object")
        else:
            record = {"text": line.rstrip("\n")}
        missing = [r for r in needed if record.get(r) is None]
        if missing:
            raise DataError(f"{source}, line {number}: missing field(s) {missing}; this adapter reads "
                            f"{list(needed)} (optional {list(optional)})")
        records.append(record)
    return records


def positive_int(text: str) -> int:
    """argparse type: a count that must be at least 1 (0 would mean an empty output, or no text)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_lightning.predict", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="an adapter directory (adapter_config.json + safetensors)")
    parser.add_argument("--input", default="-", help="text file, one example per line (default: stdin)")
    parser.add_argument("--output", default="-", help="JSON-lines file to write (default: stdout)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-length", type=positive_int, default=128)
    args = parser.parse_args(argv)
    try:
        module = load_pretrained(args.adapter)
        task = module.task
        fields = (tuple(r for r in task.roles if r not in ("label", "target")), tuple(task.optional_roles))
        if args.input == "-":
            records = read_records(sys.stdin, "stdin", *fields)
        else:
            if not Path(args.input).is_file():
                raise DataFileNotFound(f"input file {args.input} not found (--input)")
            with open(args.input, encoding="utf-8") as f:
                records = read_records(f, args.input, *fields)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    results = predict_records(module, records, args.batch_size, args.max_length,
                              progress=len(records) > args.batch_size)
    with contextlib.nullcontext(sys.stdout) if args.output == "-" else open(args.output, "w", encoding="utf-8") as out:
        for result in results:
            out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
