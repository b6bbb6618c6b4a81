"""JSON Lines input, one reader for every command and API that takes it: blank lines are
skipped, every other line must be a JSON object, and errors name the source and the line."""

from __future__ import annotations

import json
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
