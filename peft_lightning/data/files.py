"""Rows from local files (csv / tsv / jsonl / parquet) and hub datasets, mapped to a task's roles
(text, text_pair, label, choices, tokens, target) with errors that name the file, column and row."""
from __future__ import annotations

import csv
import json
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def read_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs of a local file; `where` is "file, line N" (or "row N" for parquet)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found (set data.source or data.files)")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown format '{path.suffix}'; use one of {sorted(FORMATS)}")
    if kind == "parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}, row {i}", row
        return
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8 (byte {err.start}); re-save the file as UTF-8") from None
    rows = _jsonl_rows(path, raw) if kind == "jsonl" else _delimited_rows(path, raw, "\t" if kind == "tsv" else ",")
    for line, row in rows:
        yield f"{path}, line {line}", row


def to_roles(rows: Iterable[tuple[str, dict]], columns: dict, task, source: str) -> dict[str, list]:
    """Role-named columns from raw rows: `columns` maps each role to the row's column (a list of
    columns for `choices`, or for a text role whose columns are joined with spaces); labels go
    through the task's `label_value` (names -> indices ...)."""
    required = [r for r in task.roles if r not in columns]
    if required:
        raise ValueError(f"data.columns must name the column for {required} ({type(task).__name__} needs "
                         f"{list(task.roles)}, optional {list(task.optional_roles)})")
    roles = [r for r in (*task.roles, *task.optional_roles) if columns.get(r)]
    out: dict[str, list] = {r: [] for r in roles}
    for where, row in rows:
        for role in roles:
            names = columns[role] if isinstance(columns[role], (list, tuple)) else [columns[role]]
            for name in names:
                if name not in row:
                    raise KeyError(f"{where}: column '{name}' missing; the row has {sorted(row)}")
            if role == "choices":
                out[role].append([str(row[n]) for n in names])
            elif role == "label":
                out[role].append(task.label_value(row[names[0]], f"{where}, column '{names[0]}'"))
            elif role == "tokens":
                out[role].append([str(t) for t in row[names[0]]])
            else:  # several columns for one text role are joined (WiC: the word and its sentence)
                out[role].append(" ".join(str(row[n]) for n in names))
    if not out[roles[0]]:
        raise ValueError(f"{source}: no data rows")
    return out


def hub_rows(path: str, subset: str | None, split: str) -> Iterator[tuple[str, dict]]:
    """Rows of a hub dataset split (`split` may slice: "train[:90%]"), through `load_dataset`.

    Without a network the hub is not tried at all (a miss otherwise retries for most of a minute);
    the error says how to point the config at a local copy instead."""
    import datasets
    from huggingface_hub import constants

    name = f"hub:{path}" + (f" ({subset})" if subset else "")
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    try:
        if not offline and not _reachable("huggingface.co"):
            raise ConnectionError("huggingface.co is not reachable")
        ds = datasets.load_dataset(path, subset, split=split)
    except Exception as err:  # noqa: BLE001 - every failure here gets the same advice
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConnectionError(
            f"data.source={name}, split '{split}': cannot load it from the Hugging Face hub here ({reason}). "
            "Point the data config at a local copy instead: data.source=path/to/file.{csv,tsv,jsonl,parquet} "
            "(split by data.split) or data.files={train: ..., validation: ..., test: ...}, with data.columns naming "
            "its columns; or, with HF_HUB_OFFLINE=1, a datasets cache (HF_DATASETS_CACHE) that already holds it."
        ) from None
    for i, row in enumerate(ds):
        yield f"{name}, split '{split}', row {i}", row


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


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
