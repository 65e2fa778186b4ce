"""Rows from local files (csv / tsv / jsonl / parquet) and hub datasets, mapped to a task's roles
(text, text_pair, label, choices, tokens, target) with errors that name the file, column and row.

Reading rules (each one closes a way a file could parse and still train on the wrong thing):
- a UTF-8 byte-order mark is dropped (else the first column's name would not match);
- a header naming one column twice is an error (a dict keeps only the last column);
- a `.csv` whose header has no ',' but a ';' or a tab is read with that delimiter (a warning says so);
- csv fields may be as long as the file (the csv module's default limit is 128 KiB);
- `.tsv` quotes are text (GLUE's convention): a `"` inside a sentence never merges the rows after it;
- a `.csv` field whose quoted line breaks hold lines that each look like a row is an error (a stray
  quote, closed rows later by another one, would otherwise merge those rows into one text silently);
- JSONL lines end at '\\n' only: U+2028/U+2029 and other Unicode line breaks are text inside strings;
- text roles must hold strings: null, numbers, lists are errors, never `str()`-ed into "None", "12345".
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from peft_lightning.errors import DataColumnError, DataError, DataFileNotFound, DataSourceUnavailable

log = logging.getLogger(__name__)
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
DELIMITERS = {"csv": ",", "tsv": "\t"}


def read_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs of a local file; `where` is "file, line N" (or "row N" for parquet)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"data file {path} not found (set data.source or data.files)")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown format '{path.suffix}'; use one of {sorted(FORMATS)}")
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        _no_duplicate_columns(path, table.column_names, "the schema")
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}, row {i}", row
        return
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # Excel and Notepad write one; it would glue onto the first column's name
        data = data[len(codecs.BOM_UTF8):]
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 (byte {err.start}); re-save the file as UTF-8") from None
    rows = _jsonl_rows(path, raw) if kind == "jsonl" else _delimited_rows(path, raw, DELIMITERS[kind])
    for line, row in rows:
        yield f"{path}, line {line}", row


def to_roles(rows: Iterable[tuple[str, dict]], columns: dict, task, source: str) -> dict[str, list]:
    """Role-named columns from raw rows: `columns` maps each role to the row's column (a list of
    columns for `choices`, or for a text role whose columns are joined with spaces); labels go
    through the task's `label_value` (names -> indices ...); text must be text (see the module doc)."""
    required = [r for r in task.roles if r not in columns]
    if required:
        raise DataError(f"data.columns must name the column for {required} ({type(task).__name__} needs "
                        f"{list(task.roles)}, optional {list(task.optional_roles)})")
    roles = [r for r in (*task.roles, *task.optional_roles) if columns.get(r)]
    out: dict[str, list] = {r: [] for r in roles}
    for where, row in rows:
        for role in roles:
            names = columns[role] if isinstance(columns[role], (list, tuple)) else [columns[role]]
            for name in names:
                if name not in row:
                    raise DataColumnError(f"{where}: column '{name}' missing; the row has {sorted(row)}")
            if role == "choices":
                out[role].append([_text(row[n], where, n) for n in names])
            elif role == "label":
                if row[names[0]] is None:
                    raise DataError(f"{where}, column '{names[0]}': the label is empty (null)")
                out[role].append(task.label_value(row[names[0]], f"{where}, column '{names[0]}'"))
            elif role == "tokens":
                words = row[names[0]]
                if not isinstance(words, (list, tuple)):
                    raise DataError(f"{where}, column '{names[0]}': expected a list of words, got "
                                    f"{_kind(words)} {_short(words)}")
                out[role].append([_text(w, f"{where}, word {i}", names[0]) for i, w in enumerate(words)])
            else:  # several columns for one text role are joined (WiC: the word and its sentence)
                out[role].append(" ".join(_text(row[n], where, n) for n in names))
        if "tokens" in out and "label" in out and len(out["tokens"][-1]) != len(out["label"][-1]):
            raise DataError(f"{where}: {len(out['tokens'][-1])} words but {len(out['label'][-1])} tags "
                            f"(columns '{columns['tokens']}', '{columns['label']}')")
    if not out[roles[0]]:
        raise DataError(f"{source}: no data rows")
    return out


def _text(value, where: str, column: str) -> str:
    if isinstance(value, str):
        return value
    shown = "" if value is None else f" {_short(value)}"
    raise DataError(f"{where}, column '{column}': expected text, got {_kind(value)}{shown}; "
                    "fix the row (text columns must hold strings)")


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", tuple: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
        raise DataSourceUnavailable(
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


def _no_duplicate_columns(path, header: list[str], where: str) -> None:
    twice = [c for i, c in enumerate(header) if c in header[:i]]
    if twice:
        raise DataError(f"{path}, {where}: column '{twice[0]}' appears {header.count(twice[0])} times; "
                        "rename the columns so each name is unique (only one of them could be read)")


def _delimiter(path, raw: str, expected: str) -> str:
    """`expected`, unless the header is a single field holding another of ',', ';', tab: then
    the delimiter csv.Sniffer finds among those (a ';'-separated "csv" from a European Excel)."""
    first = raw.split("\n", 1)[0]
    others = [d for d in (",", ";", "\t") if d != expected and d in first]
    if not others or len(next(csv.reader([first], delimiter=expected))) > 1:
        return expected
    sample = "\n".join(raw.split("\n")[:50])
    try:
        found = csv.Sniffer().sniff(sample, delimiters="".join(others)).delimiter
    except csv.Error:
        found = None
    if found not in others:
        raise DataError(f"{path}, line 1: the header has no {expected!r} but {others[0]!r}, and the rows do not "
                        f"split consistently on it; save the file {expected!r}-separated")
    log.warning("%s is %r-separated, not %r: reading it with %r", path, found, expected, found)
    return found


def _delimited_rows(path, raw, delimiter):
    delimiter = _delimiter(path, raw, delimiter)
    # no field is longer than the file (the default limit, 128 KiB, stops long documents);
    # bounded so the C long the limit is stored in never overflows
    csv.field_size_limit(max(csv.field_size_limit(), min(len(raw) + 1, 2**31 - 1)))
    # newline="": quoted fields may hold line breaks, and only \n / \r end a line (not U+2028).
    # tsv: QUOTE_NONE, quotes are text (GLUE's files hold unbalanced '"' inside sentences)
    quoting = csv.QUOTE_NONE if delimiter == "\t" and Path(path).suffix.lower() == ".tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file") from None
    except csv.Error as err:
        raise DataError(f"{path}, line 1: {err}") from None
    _no_duplicate_columns(path, header, "line 1 (the header)")
    line_end = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{path}, line {reader.line_num}: {err}") from None
        start, line = line_end + 1, reader.line_num
        line_end = line
        if not row:
            continue
        _no_rows_in_quotes(path, row, start, delimiter, len(header))
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)} ({header})")
        yield line, dict(zip(header, row))


def _no_rows_in_quotes(path, row: list[str], start: int, delimiter: str, columns: int) -> None:
    """A quoted field spanning lines of which some hold a whole row's delimiters is a stray quote
    that swallowed rows (a real multi-line text rarely has a row's worth of delimiters on a line).
    With one column every line would look like a row, so single-column files are not checked."""
    if columns < 2:
        return
    opened = start
    for field in row:
        lines = _LINE_BREAK.split(field)
        if len(lines) > 1:
            rows = sum(text.count(delimiter) >= columns - 1 for text in lines)
            if rows:
                raise DataError(f"{path}, line {opened}: a quote opened here runs over {rows} lines that each look "
                                "like a row; close the quote (or double it inside the text)")
        opened += len(lines) - 1


_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the csv module's line ends (not U+2028)


def _jsonl_rows(path, raw):
    # '\n' only: str.splitlines would also break at U+2028/U+2029, \x0b, \x1c.. inside JSON strings
    for line, text in enumerate(raw.split("\n"), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text, object_pairs_hook=lambda pairs, line=line: _object(path, line, pairs))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {line}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            # a .json file holding one JSON array (or object over many lines) is the usual mistake
            raise DataError(f"{path}, line {line}: expected a JSON object, got {type(row).__name__}; "
                            ".json files are read as JSON Lines (one object per line)")
        yield line, row


def _object(path, line: int, pairs: list) -> dict:
    """A JSON object, refusing a repeated key (json.loads keeps the last one silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise DataError(f"{path}, line {line}: key '{key}' appears twice in one object; keep one")
        out[key] = value
    return out
