"""Local labelled files (csv / tsv / jsonl), read with errors that name the file, column and row."""
from __future__ import annotations

import csv
import json
from pathlib import Path

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def read_labelled_file(path: str | Path, text_column: str, label_column: str, labels: list[str]) -> dict[str, list]:
    """Columns `text` and `label` (an index into `labels`; string labels are matched by name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found (set data.source or data.files)")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown format '{path.suffix}'; use one of {sorted(FORMATS)}")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8 (byte {err.start}); re-save the file as UTF-8") from None
    rows = _jsonl_rows(path, raw) if kind == "jsonl" else _delimited_rows(path, raw, "\t" if kind == "tsv" else ",")
    texts, ys = [], []
    for line, row in rows:
        for column in (text_column, label_column):
            if column not in row:
                raise KeyError(f"{path}, line {line}: column '{column}' missing; the row has {sorted(row)}")
        texts.append(str(row[text_column]))
        ys.append(_label_index(path, line, label_column, row[label_column], labels))
    if not texts:
        raise ValueError(f"{path}: no data rows")
    return {"text": texts, "label": ys}


def _label_index(path, line, column, value, labels):
    value = str(value).strip()
    if value in labels:
        return labels.index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(labels):
        return int(value)
    raise ValueError(f"{path}, line {line}, column '{column}': label {value!r} is not in data.labels {labels}")


def _delimited_rows(path, raw, delimiter):
    reader = csv.reader(raw.splitlines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{path}: empty file") from None
    for row in reader:
        line = reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)} ({header})")
        yield line, dict(zip(header, row))


def _jsonl_rows(path, raw):
    for line, text in enumerate(raw.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {line}: expected a JSON object, got {type(row).__name__}")
        yield line, row
