"""Line-oriented input, one reader for every command and API that takes it: blank lines are
skipped, every error names the source and the line (`path:line: ...`). CSV files are read with
their header (the first row names the columns); a row's number counts data rows from 1."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator


def decode_line(raw: bytes, source: str, number: int) -> str:
    """A raw line as text, its line ending kept; not UTF-8 is an error naming `source:number`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{source}:{number}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None


def parse_record(line: str, source: str, number: int) -> dict:
    """One JSONL line (not blank) as its JSON object; errors name `source:number`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}:{number}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{source}:{number}: expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(lines: Iterable[str], source: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of `lines` (from `source`, for errors)."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield number, parse_record(line, source, number)


def csv_rows(stream, source: str, first_row: int = 1, offset: int = 0):
    """(row number, fields, byte offset just after the row) for each CSV row of the binary
    `stream` (positioned at byte `offset`, where row `first_row` starts). Quoted fields may span
    lines; a blank line is a row with no fields."""
    position, row = offset, first_row

    def lines():
        nonlocal position
        for raw in stream:
            position += len(raw)
            yield decode_line(raw, source, row)

    reader = csv.reader(lines(), strict=True)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{source}:{row}: not valid CSV ({e})") from None
        yield row, fields, position
        row += 1


def csv_header(stream, source: str) -> tuple[list[str], int]:
    """(column names, byte offset of the first data row) of a CSV file's binary stream."""
    for _, fields, end in csv_rows(stream, source, first_row=0):
        names = [name.lstrip("\ufeff") if i == 0 else name for i, name in enumerate(fields)]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{source}: the CSV header {fields} must name each column once")
        return names, end
    raise ValueError(f"{source}: an empty CSV file (no header)")


def csv_record(names: list[str], fields: list[str], source: str, row: int) -> dict:
    """A CSV row as {column: value}; a row of another width is an error naming `source:row`."""
    if len(fields) != len(names):
        raise ValueError(f"{source}:{row}: {len(fields)} field(s), the header has {len(names)}")
    return dict(zip(names, fields))


class TextInput:
    """The texts of a file (or "-": stdin), read line by line as they are needed.

    Plain text: one text per line. JSONL (a `.jsonl` file, or any input with `text_field`): one
    JSON object per line, its `text_field` (default "text") is the text. CSV (a `.csv` file):
    the header names the columns, `text_field` (default "text") is the text. In all, a blank
    (whitespace-only) line or text is skipped and counted in `skipped`, and every error names
    the line (the data row for CSV). Iterating yields (text, record), record None for plain
    text.
    """

    def __init__(self, path: str, text_field: str | None = None):
        self.path, self.skipped = path, 0
        self.csv = path.endswith(".csv")
        self.jsonl = not self.csv and (text_field is not None or path.endswith(".jsonl"))
        self.field = text_field or "text"

    def _lines(self):
        stream = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")
        name = "stdin" if self.path == "-" else self.path
        try:
            for number, raw in enumerate(stream, 1):
                line = decode_line(raw, name, number).rstrip("\r\n")
                if not line.strip():
                    self.skipped += 1
                    line = ""  # read_jsonl skips it too
                yield line
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()

    def _csv(self) -> Iterator[tuple[str, dict]]:
        with open(self.path, "rb") as f:
            names, offset = csv_header(f, self.path)
            if self.field not in names:
                raise ValueError(
                    f"{self.path}: no column {self.field!r} in the CSV header "
                    f"{names} (--text-field)"
                )
            for row, fields, _ in csv_rows(f, self.path, 1, offset):
                if not fields:
                    self.skipped += 1
                    continue
                record = csv_record(names, fields, self.path, row)
                if not record[self.field].strip():
                    self.skipped += 1
                    continue
                yield record[self.field], record

    def __iter__(self) -> Iterator[tuple[str, dict | None]]:
        name = "stdin" if self.path == "-" else self.path
        if self.csv:
            yield from self._csv()
            return
        if not self.jsonl:
            for line in self._lines():
                if line:
                    yield line, None
            return
        for number, record in read_jsonl(self._lines(), name):
            text = record.get(self.field)
            if not isinstance(text, str):
                raise ValueError(f"{name}:{number}: no string field {self.field!r}")
            yield text, record
