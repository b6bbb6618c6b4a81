"""The input files of a corpus: which files (`expand`), what they hold (`scan`: format, rows,
where each shard's rows start) and their rows (`read_rows`), one range at a time.

Formats, by suffix: `.txt` (one text per line), `.jsonl`/`.ndjson` (one JSON object per line,
`text_field` is the text), `.csv` (the header names the columns), `.parquet` (read a row group at
a time, never whole). A file named on its own with another suffix is read as today's `embed`
reads it (text, or JSONL with --text-field); inside a folder or a glob it is an error.

Every error names `file:row` (row as in `schema.py`: from 1) or the file and the column.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..records import csv_header, csv_record, csv_rows, decode_line, parse_record
from .arrow import pa, pq

SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
READ_ROWS = 8192  # Parquet rows decoded at a time
SCAN_BYTES = 1 << 22


@dataclasses.dataclass(frozen=True)
class Fields:
    """Which fields of a record are read: the text, the id (None: `schema.default_id`), and the
    fields carried into the output."""

    text: str = "text"
    id: str | None = None
    keep: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input file as scanned: `rows` rows; `offsets[j]` is the byte where row
    j * `every` + 1 starts (text, JSONL, CSV), so a shard's range is read without the rows
    before it. `types`: {field: Arrow type} of a Parquet file's id and kept columns."""

    path: str
    name: str
    format: str
    size: int
    mtime_ns: int
    rows: int
    every: int
    offsets: tuple[int, ...] = ()
    types: tuple[tuple[str, str], ...] = ()
    arrow_types: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def fingerprint(self) -> dict:
        """What the manifest records of this file (a rerun compares it)."""
        fields = ("path", "name", "format", "size", "mtime_ns", "rows")  # the scan's facts
        return {name: getattr(self, name) for name in fields}


def _format(path: str, text_field: str | None, alone: bool) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if alone:  # as `embed` reads a single file today
        return "jsonl" if text_field is not None else "text"
    raise ValueError(
        f"{path}: not a known input format ({', '.join(sorted(SUFFIXES))}); name "
        "it on its own to read it as text"
    )


def _glob_root(pattern: str) -> str:
    parts = []
    for part in pattern.split(os.sep):
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.sep.join(parts) or "."


def expand(specs: Sequence[str], text_field: str | None = None) -> list[tuple[str, str, str]]:
    """(absolute path, input name, format) of every file of the input specs (a file, a folder:
    every file under it but hidden ones, or a glob), in order: each spec's files sorted by
    name. A spec that names nothing, a file given twice, or two files under one name is an
    error."""
    out, seen, names = [], {}, {}
    for spec in specs:
        if os.path.isfile(spec):
            found = [(spec, os.path.dirname(spec) or ".", True)]
        elif os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [
                    (os.path.join(root, f), spec, False) for f in files if not f.startswith(".")
                ]
            if not found:
                raise ValueError(f"--input {spec}: the folder holds no files")
        elif glob.has_magic(spec):
            found = [
                (p, _glob_root(spec), False)
                for p in glob.glob(spec, recursive=True)
                if os.path.isfile(p)
            ]
            if not found:
                raise ValueError(f"--input {spec}: no file matches")
        else:
            raise ValueError(f"--input {spec}: no such file or folder")
        for path, root, alone in sorted(found, key=lambda f: f[0]):
            real = os.path.realpath(path)
            if real in seen:
                raise ValueError(f"--input: {path} is given twice (also as {seen[real]})")
            seen[real] = path
            name = os.path.relpath(path, root)
            if name in names:
                raise ValueError(
                    f"--input: {path} and {names[name]} have the same name "
                    f"{name!r}; give them as one folder"
                )
            names[name] = path
            out.append((os.path.abspath(path), name, _format(path, text_field, alone)))
    return out


def _line_offsets(path: str, every: int) -> tuple[int, tuple[int, ...]]:
    """(lines, byte offsets of lines 1, every + 1, 2 * every + 1, ...) of a text/JSONL file."""
    offsets, lines, position, last = [0], 0, 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_BYTES):
            ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
            # line k (0-based) starts after newline k - 1: those with k a multiple of every
            ks = np.arange(lines + 1, lines + 1 + len(ends))
            offsets += (position + ends[ks % every == 0] + 1).tolist()
            lines += len(ends)
            position += len(chunk)
            last = chunk[-1:]
    if last != b"\n":
        lines += 1  # a last line without its newline
    elif offsets and offsets[-1] == position:
        offsets.pop()  # no line starts at the end of the file
    return lines, tuple(offsets[: -(-lines // every)] if lines else ())


def _csv_offsets(path: str, every: int) -> tuple[int, tuple[int, ...], list[str]]:
    with open(path, "rb") as f:
        names, start = csv_header(f, path)
        offsets, rows = [start], 0
        for rows, _, end in csv_rows(f, path, 1, start):
            if rows % every == 0:
                offsets.append(end)
    return rows, tuple(offsets[: -(-rows // every)] if rows else ()), names


def scan(path: str, name: str, fmt: str, fields: Fields, every: int) -> InputFile:
    """Reads enough of a file to plan it: its rows (Parquet: from the metadata), where every
    `every`-th row starts, and that the fields exist where a header or schema says."""
    stat = os.stat(path)
    info: dict[str, Any] = dict(
        path=path, name=name, format=fmt, size=stat.st_size, mtime_ns=stat.st_mtime_ns, every=every
    )
    wanted = [f for f in (fields.id, *fields.keep) if f is not None]
    if fmt == "parquet":
        try:
            meta = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
        schema = meta.schema_arrow
        for field in [fields.text, *wanted]:
            if schema.get_field_index(field) < 0:
                flag = (
                    "--text-field"
                    if field == fields.text
                    else ("--id-field" if field == fields.id else "--keep-fields")
                )
                raise ValueError(f"{path}: no column {field!r} ({flag}); it has {schema.names}")
        text_type = schema.field(fields.text).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            raise ValueError(
                f"{path}: column {fields.text!r} (--text-field) is {text_type}, not strings"
            )
        types = {f: schema.field(f).type for f in wanted}
        return InputFile(
            **info,
            rows=meta.metadata.num_rows,
            types=tuple((f, str(t)) for f, t in types.items()),
            arrow_types=types,
        )
    if fmt == "csv":
        rows, offsets, names = _csv_offsets(path, every)
        for field in [fields.text, *wanted]:
            if field not in names:
                raise ValueError(f"{path}: no column {field!r} in the CSV header {names}")
        return InputFile(**info, rows=rows, offsets=offsets)
    rows, offsets = _line_offsets(path, every)
    if fmt == "text" and wanted:
        raise ValueError(
            f"{path}: a text file has no fields (--id-field / --keep-fields "
            "need JSONL, CSV or Parquet input)"
        )
    return InputFile(**info, rows=rows, offsets=offsets)


def read_rows(file: InputFile, start: int, stop: int, fields: Fields) -> Iterator[tuple]:
    """(row, text, id, kept values) for rows start + 1 .. stop of `file` (0-based [start,
    stop), `start` a multiple of `file.every`). text may be None or blank (the caller decides);
    id is None when `fields.id` is None; values come as the file holds them."""
    if fmt_reader := _READERS.get(file.format):
        yield from fmt_reader(file, start, stop, fields)
        return
    raise ValueError(f"{file.path}: unknown format {file.format!r}")


def _offset(file: InputFile, start: int) -> int:
    if start % file.every or start // file.every >= len(file.offsets):
        raise ValueError(f"{file.path}: row {start + 1} is not where a planned range starts")
    return file.offsets[start // file.every]


def _lines(file: InputFile, start: int, stop: int) -> Iterator[tuple[int, str]]:
    with open(file.path, "rb") as f:
        f.seek(_offset(file, start))
        for row in range(start + 1, stop + 1):
            raw = f.readline()
            if not raw:
                raise ValueError(
                    f"{file.path}:{row}: the file ended early (it changed since it was planned)"
                )
            yield row, decode_line(raw, file.name, row).rstrip("\r\n")


def _text_rows(file, start, stop, fields):
    for row, line in _lines(file, start, stop):
        yield row, line, None, ()


def _field(record: dict, field: str, file: InputFile, row: int):
    if field not in record:
        raise ValueError(f"{file.name}:{row}: no field {field!r}")
    return record[field]


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _carried(record: dict, field: str, flag: str, file: InputFile, row: int):
    """An id or kept value, which is carried as given: a lone UTF-16 surrogate in it (a JSON
    escape like "\\ud800" can make one) has no UTF-8 form for the Parquet column, and replacing
    it would change the value, so it is an error naming the row and field. (A text's surrogates
    are replaced by U+FFFD as the tokenizer needs: it is embedded, not carried.)"""
    value = _field(record, field, file, row)
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if (m := _LONE_SURROGATE.search(text)) is not None:
        raise ValueError(
            f"{file.name}:{row}: field {field!r} ({flag}) holds a lone UTF-16 surrogate "
            f"{m.group()!r} at character {m.start()}, which has no UTF-8 form: fix the input"
        )
    return value


def _jsonl_rows(file, start, stop, fields):
    for row, line in _lines(file, start, stop):
        if not line.strip():
            yield row, "", None, ()
            continue
        record = parse_record(line, file.name, row)
        text = _field(record, fields.text, file, row)
        if text is not None and not isinstance(text, str):
            raise ValueError(
                f"{file.name}:{row}: field {fields.text!r} is {type(text).__name__}, not a string"
            )
        ident = None if fields.id is None else _carried(record, fields.id, "--id-field", file, row)
        kept = tuple(_carried(record, k, "--keep-fields", file, row) for k in fields.keep)
        yield row, text, ident, kept


def _csv_rows(file, start, stop, fields):
    with open(file.path, "rb") as f:
        names, _ = csv_header(f, file.name)
        f.seek(_offset(file, start))
        row = start
        for row, values, _ in csv_rows(f, file.name, start + 1, f.tell()):
            if row > stop:
                return
            if not values:
                yield row, "", None, ()
                continue
            record = csv_record(names, values, file.name, row)
            ident = None if fields.id is None else record[fields.id]
            yield row, record[fields.text], ident, tuple(record[k] for k in fields.keep)
        if row < stop:
            raise ValueError(
                f"{file.path}:{row + 1}: the file ended early (it changed since it was planned)"
            )


def _parquet_rows(file, start, stop, fields):
    columns = list(
        dict.fromkeys(c for c in (fields.text, fields.id, *fields.keep) if c is not None)
    )
    pf = pq.ParquetFile(file.path)
    first = 0
    for group in range(pf.metadata.num_row_groups):
        count = pf.metadata.row_group(group).num_rows
        lo, hi = max(start, first), min(stop, first + count)
        if lo < hi:
            at = first
            for batch in pf.iter_batches(READ_ROWS, row_groups=[group], columns=columns):
                b_lo, b_hi = max(lo, at), min(hi, at + len(batch))
                if b_lo < b_hi:
                    part = batch.slice(b_lo - at, b_hi - b_lo)
                    values = {c: part.column(c).to_pylist() for c in columns}
                    texts = values[fields.text]
                    ids = values[fields.id] if fields.id is not None else [None] * len(texts)
                    kept = (
                        list(zip(*(values[k] for k in fields.keep)))
                        if fields.keep
                        else [()] * len(texts)
                    )
                    yield from zip(range(b_lo + 1, b_hi + 1), texts, ids, kept)
                at += len(batch)
                if at >= hi:
                    break
        first += count
        if first >= stop:
            break


_READERS = {"text": _text_rows, "jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}
