"""Line-oriented input, one reader for every command and API that takes it: blank lines are
skipped, every error names the source and the line (`path:line: ...`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator


def read_jsonl(lines: Iterable[str], source: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of `lines` (from `source`, for errors)."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{source}:{number}: expected a JSON object, got "
                             f"{type(record).__name__}")
        yield number, record


class TextInput:
    """The texts of a file (or "-": stdin), read line by line as they are needed.

    Plain text: one text per line. JSONL (a `.jsonl` file, or any input with `text_field`): one
    JSON object per line, its `text_field` (default "text") is the text. In both, a blank
    (whitespace-only) line is skipped and counted in `skipped`, and every error names the line.
    Iterating yields (text, record), record None for plain text.
    """

    def __init__(self, path: str, text_field: str | None = None):
        self.path, self.skipped = path, 0
        self.jsonl = text_field is not None or path.endswith(".jsonl")
        self.field = text_field or "text"

    def _lines(self):
        stream = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")
        name = "stdin" if self.path == "-" else self.path
        try:
            for number, raw in enumerate(stream, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{name}:{number}: not UTF-8 text ({e.reason} at byte "
                                     f"{e.start})") from None
                line = line.rstrip("\r\n")
                if not line.strip():
                    self.skipped += 1
                    line = ""  # read_jsonl skips it too
                yield line
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()

    def __iter__(self) -> Iterator[tuple[str, dict | None]]:
        name = "stdin" if self.path == "-" else self.path
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
