"""Late chunking: chunk embeddings that keep their document's context.

The whole document (with the task's instruction) goes through the encoder; a chunk's vector is
the mean of the final states of the tokens whose first character lies inside the chunk's span
(a token's first character: the first non-space one it covers, so "▁word" belongs where "w"
is; instruction and special tokens belong to no chunk), then Matryoshka truncation and L2
normalisation, as `encode` does for whole texts.

Chunks, in character offsets of the document: the caller's `spans`; else `chunk_tokens`-token
pieces; else sentences (a boundary after each run of `.`, `!`, `?` followed by white space, and
after each newline; the white space after a boundary opens the next sentence, so sentences cover
the document).

Long documents. A document of more than `max_length` tokens is cut into windows of at most
`max_length` tokens (each with `<s>`, the instruction and `</s>`), consecutive windows sharing
`overlap` document tokens (default: a quarter of a window's document tokens, at most 512). A token's margin in a window is its distance to the nearer edge of
the window's document tokens; each token's state is taken from the window where that margin is
largest (ties: the earlier window), so it always has context on both sides where any window gives
it some, and no chunk loses its document context at a window edge. A document that fits in one
window gives exactly the single-forward result.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from .encode import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_TOKEN_BUDGET,
    Runner,
    check_options,
    finish,
    progress,
)
from .tokenize import check_max_length, check_texts, without_lone_surrogates

DEFAULT_OVERLAP = 512
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)\s*|\n\s*")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, covering it in order."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if match.end() > start:
            spans.append((start, match.end()))
            start = match.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def check_spans(spans, text: str, where: str) -> list[tuple[int, int]]:
    """Spans as a list of (start, end) ints: non-empty, inside the text, in order, disjoint."""
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence) or not spans:
        raise ValueError(f"{where}: spans must be a non-empty list of (start, end) pairs")
    out, previous_end = [], 0
    for j, span in enumerate(spans):
        ok = (
            isinstance(span, Sequence)
            and len(span) == 2
            and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in span)
        )
        if not ok:
            raise ValueError(f"{where}: span {j} is {span!r}, not a (start, end) pair of ints")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= len(text):
            raise ValueError(
                f"{where}: span {j} ({start}, {end}) is empty or outside the "
                f"document's {len(text)} characters"
            )
        if start < previous_end:
            raise ValueError(
                f"{where}: span {j} ({start}, {end}) starts before span {j - 1} "
                f"ends ({previous_end}); spans must be in order and disjoint"
            )
        out.append((start, end))
        previous_end = end
    return out


def _first_chars(encoding, text: str) -> np.ndarray:
    """Per token, the index of its first non-space character in `text` (-1 for specials)."""
    out = np.full(len(encoding.ids), -1, np.int64)
    for t, ((start, end), special) in enumerate(
        zip(encoding.offsets, encoding.special_tokens_mask)
    ):
        if special or start >= end:
            continue
        while start < end - 1 and text[start].isspace():
            start += 1
        out[t] = start
    return out


def _token_spans(first: np.ndarray, chunk_tokens: int, length: int):
    """Fixed pieces of `chunk_tokens` document tokens, as character spans covering the text."""
    starts = first[first >= 0]
    cuts = [0] + [int(starts[i]) for i in range(chunk_tokens, len(starts), chunk_tokens)]
    return [(a, b) for a, b in zip(cuts, cuts[1:] + [length]) if b > a]


def windows(n_doc: int, capacity: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) document-token ranges of the windows: `capacity` tokens each, consecutive
    ones sharing `overlap`, the last one ending at the document's end."""
    if n_doc <= capacity:
        return [(0, n_doc)]
    stride = capacity - overlap
    out = [(s, s + capacity) for s in range(0, n_doc - capacity, stride)]
    out.append((n_doc - capacity, n_doc))
    return out


def best_window(n_doc: int, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Per document token, the window where its smaller distance to an edge is largest."""
    position = np.arange(n_doc)
    margins = np.stack(
        [
            np.where(
                (position >= a) & (position < b), np.minimum(position - a, b - 1 - position), -1
            )
            for a, b in ranges
        ]
    )
    return margins.argmax(0)  # argmax takes the first (earlier) window on ties


@dataclasses.dataclass
class Prepared:
    """One document cut into model rows: window ids, their ranges of document tokens, each
    document token's first character (document offsets), the instruction's length in tokens
    (with `<s>`), and the chunk spans."""

    rows: list
    ranges: list
    first: np.ndarray
    n_head: int
    spans: list

    def pool(self, window_states, index: int) -> np.ndarray:
        """Chunk means [n_chunks, H] from the windows' token states [n_tokens, H] each."""
        best = best_window(len(self.first), self.ranges)
        # [T, H]: each document token's state from its best window.
        hidden = (
            np.stack(
                [window_states[w][self.n_head + t - self.ranges[w][0]] for t, w in enumerate(best)]
            )
            if len(self.first)
            else None
        )
        pooled = np.zeros((len(self.spans), window_states[0].shape[-1]), np.float32)
        for j, (start, end) in enumerate(self.spans):
            inside = (self.first >= start) & (self.first < end)
            if not inside.any():
                raise ValueError(
                    f"documents[{index}]: chunk {j} (characters {start}..{end}) "
                    "has no token of its own"
                )
            assert hidden is not None  # a chunk has tokens, so self.first is not empty
            pooled[j] = hidden[inside].mean(0)
        return pooled


def _prepare(model, doc, task, index, prompt, max_length, overlap, spans, chunk_tokens):
    cfg, tokenizer = model.config, model.tokenizer
    prefix = prompt if prompt is not None else ("" if task is None else cfg.instruction(task))
    doc = without_lone_surrogates(doc)
    tokenizer.no_truncation()
    encoding = tokenizer.encode(prefix + doc)
    ids = np.asarray(encoding.ids, np.int32)
    first = _first_chars(encoding, prefix + doc)
    # <s> + instruction tokens | document tokens | </s>, split where the document begins.
    in_doc = first >= len(prefix)
    n_head = int(np.argmax(in_doc)) if in_doc.any() else len(ids) - 1
    head, body, tail = ids[:n_head], ids[n_head:-1], ids[-1:]
    capacity = max_length - len(head) - len(tail)
    if capacity < 1:
        raise ValueError(
            f"documents[{index}]: the instruction alone takes {len(head)} of "
            f"max_length={max_length} tokens"
        )
    if overlap is None:
        overlap = min(DEFAULT_OVERLAP, capacity // 4)
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < capacity:
        raise ValueError(
            f"overlap must be in 0..{capacity - 1} (max_length {max_length} less "
            f"the instruction and special tokens), got {overlap!r}"
        )
    ranges = windows(len(body), capacity, overlap)
    doc_first = np.where(first[n_head:-1] >= 0, first[n_head:-1] - len(prefix), -1)
    if spans is not None:
        doc_spans = check_spans(spans, doc, f"spans[{index}]")
    elif chunk_tokens is not None:
        doc_spans = _token_spans(doc_first, chunk_tokens, len(doc))
    else:
        doc_spans = sentence_spans(doc)
    rows = [np.concatenate([head, body[a:b], tail]) for a, b in ranges]
    return Prepared(rows, ranges, doc_first, len(head), doc_spans)


def prepare_document(
    model, document: str, task, *, max_length: int, spans=None, overlap: int | None = None
) -> Prepared:
    """One document's windows (`rows`) and chunks as `encode_late_chunks` cuts them, for a
    caller that runs the windows itself (the server: one at a time, so that it can stop between
    them); `Prepared.pool` of their states gives the chunk means."""
    return _prepare(model, document, task, 0, None, max_length, overlap, spans, None)


def encode_late_chunks(
    model,
    documents,
    task="retrieval.passage",
    *,
    spans=None,
    chunk_tokens: int | None = None,
    max_length: int | None = None,
    overlap: int | None = None,
    truncate_dim: int | None = None,
    normalize: bool = True,
    batch_size: int = 32,
    prompt: str | None = None,
    max_tokens_per_batch: int = DEFAULT_TOKEN_BUDGET,
    show_progress_bar: bool | None = None,
):
    """See `JinaEmbeddingsV3.encode_late_chunks`."""
    cfg = model.config
    single = isinstance(documents, str)
    documents = [documents] if single else documents
    check_texts(documents)
    if spans is not None:
        if single:
            spans = [spans]
        if not isinstance(spans, Sequence) or len(spans) != len(documents):
            raise ValueError("spans needs one list of (start, end) pairs per document")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if spans is not None and chunk_tokens is not None:
        raise ValueError("give spans or chunk_tokens, not both")
    truncate_dim = cfg.truncate_dim if truncate_dim is None else truncate_dim
    max_length = check_max_length(max_length, cfg, DEFAULT_MAX_LENGTH)
    _, dim = check_options(
        model,
        batch_size=batch_size,
        max_length=max_length,
        truncate_dim=truncate_dim,
        max_tokens_per_batch=max_tokens_per_batch,
        window=1,
    )
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
    row_tasks = model.resolve_tasks(task, len(documents), "documents")
    results = []
    group = max(64, batch_size)  # documents prepared and run together
    if show_progress_bar is None:  # on for long jobs only
        show_progress_bar = len(documents) >= group
    with progress(None, batch_size, show_progress_bar, "late chunks") as bar:
        runner = Runner(model, batch_size, max_tokens_per_batch, hidden=True, bar=bar)
        for first_doc in range(0, len(documents), group):
            picked = range(first_doc, min(first_doc + group, len(documents)))
            prepared = [
                _prepare(
                    model,
                    documents[i],
                    row_tasks[i],
                    i,
                    prompt,
                    max_length,
                    overlap,
                    None if spans is None else spans[i],
                    chunk_tokens,
                )
                for i in picked
            ]
            states = runner.submit(
                [r for p in prepared for r in p.rows],
                [row_tasks[i] for i, p in zip(picked, prepared) for _ in p.rows],
            )
            runner.drain()
            k = 0
            for i, doc in zip(picked, prepared):
                results.append(
                    (finish(doc.pool(states[k : k + len(doc.rows)], i), dim, normalize), doc.spans)
                )
                k += len(doc.rows)
    return results[0] if single else results
