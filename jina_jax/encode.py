"""Texts in, embeddings out, as the release's `encode` computes them:

    instruction + text -> tokenizer (truncate at max_length, `<s> ... </s>` kept)
      -> encoder with the task's adapter -> mean pool over real tokens
      -> Matryoshka truncation -> L2 normalisation -> float32 [N, D] in input order

Batching. The input is read a window of texts at a time. In a window, texts are grouped by task
and sorted by length, longest first; consecutive texts form a batch whose width is the smallest
rung of a fixed length ladder (`tokenize.WIDTHS`, six rungs an octave) that holds its longest
text, and whose row count is fixed per width (`batch_size`, capped by a token budget); a task's
last batch of a window takes the next power of two. Sorted neighbours have nearly equal lengths,
so padding stays near the ladder's rounding, and every shape comes from a small fixed set: each
compiles once and is reused.

Pipelining. A batch is dispatched without waiting for the one before it (JAX dispatch is
asynchronous), so the host pads the next batch, and tokenizes the next window, while the device
runs. At most `IN_FLIGHT` batches are outstanding.

Streaming. `iter_encode` takes any iterable and yields one embedding per text, in input order,
holding at most two windows of texts and results; `encode` collects it into one array.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from .tokenize import (WIDTHS, bucket_for, check_max_length, check_texts, pad, position_limit,
                       token_ids)

DEFAULT_MAX_LENGTH = 8192
DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_WINDOW = 16384
IN_FLIGHT = 2
PROGRESS_MIN_BATCHES = 10
# A filler row for incomplete batches: "<s></s>", two real tokens, so nothing divides by zero.
FILLER = [0, 2]


@dataclasses.dataclass(frozen=True)
class Batch:
    task: str | None
    width: int
    rows: int
    members: tuple[int, ...]  # window indices of the texts in rows 0.. (the rest is filler)


def rows_for(width: int, count: int, batch_size: int, token_budget: int) -> int:
    """Rows of a batch of `width`: `batch_size` capped by the token budget, or for the last
    `count` texts the next power of two (so a task's tail adds few shapes)."""
    cap = max(1, min(batch_size, token_budget // width))
    return min(cap, 1 << max(0, count - 1).bit_length())


def plan(lengths: Sequence[int], row_tasks: Sequence, limit: int, batch_size: int,
         token_budget: int = DEFAULT_TOKEN_BUDGET, row_multiple: int = 1) -> list[Batch]:
    """The batches for texts of these token `lengths` and tasks (see the module docstring).
    Longest first: a shape that cannot fit in memory fails before the other work is done."""
    by_task = collections.defaultdict(list)
    for i, task in enumerate(row_tasks):
        by_task[task].append(i)
    batches = []
    for task, members in sorted(by_task.items(), key=lambda kv: kv[0] or ""):
        members.sort(key=lambda i: -lengths[i])
        start = 0
        while start < len(members):
            width = bucket_for(lengths[members[start]], limit, WIDTHS)
            rows = rows_for(width, len(members) - start, batch_size, token_budget)
            rows = -(-rows // row_multiple) * row_multiple  # every device gets rows
            batches.append(Batch(task, width, rows, tuple(members[start:start + rows])))
            start += rows
    batches.sort(key=lambda b: -b.width)
    return batches


def padding_fraction(batches: Sequence[Batch], lengths: Sequence[int]) -> float:
    """Padded positions (filler rows included) per real token of a plan."""
    real = sum(lengths[i] for b in batches for i in b.members)
    return sum(b.rows * b.width for b in batches) / max(real, 1) - 1.0


def check_options(model, *, batch_size, max_length, truncate_dim, max_tokens_per_batch,
                  window) -> tuple[int, int]:
    """Checks encode's options; returns (max_length, output dimension)."""
    cfg = model.config
    max_length = check_max_length(max_length, cfg, DEFAULT_MAX_LENGTH)
    for name, value in (("batch_size", batch_size), ("max_tokens_per_batch", max_tokens_per_batch),
                        ("window", window)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if truncate_dim is not None:
        if not isinstance(truncate_dim, int) or not 1 <= truncate_dim <= cfg.hidden_size:
            raise ValueError(f"truncate_dim must be in 1..{cfg.hidden_size}, got {truncate_dim!r}")
        if truncate_dim not in cfg.matryoshka_dimensions:
            warnings.warn(f"truncate_dim={truncate_dim} is not one of the dimensions the model was "
                          f"trained for {list(cfg.matryoshka_dimensions)}")
    return max_length, truncate_dim or cfg.hidden_size


def encode(model, texts, *, task=None, prompt=None, batch_size=32, max_length=None,
           truncate_dim=None, normalize=True, show_progress_bar=None,
           max_tokens_per_batch=DEFAULT_TOKEN_BUDGET, window=DEFAULT_WINDOW):
    """See `JinaEmbeddingsV3.encode`."""
    single = isinstance(texts, str)
    if single:
        texts = [texts]
    truncate_dim = model.config.truncate_dim if truncate_dim is None else truncate_dim
    _, dim = check_options(model, batch_size=batch_size, max_length=max_length,
                           truncate_dim=truncate_dim, max_tokens_per_batch=max_tokens_per_batch,
                           window=window)
    rows = list(iter_encode(model, texts, task=task, prompt=prompt, batch_size=batch_size,
                            max_length=max_length, truncate_dim=truncate_dim, normalize=normalize,
                            show_progress_bar=show_progress_bar,
                            max_tokens_per_batch=max_tokens_per_batch, window=window))
    emb = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
    return emb[0] if single else emb


def _texts_and_tasks(model, texts, task) -> tuple[Iterator, Iterator, int | None]:
    """(texts, one adapter name per text, count or None) for a sequence or any iterable."""
    if texts is None or isinstance(texts, (str, bytes, dict)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    if isinstance(texts, Sequence):
        check_texts(texts)
        return iter(texts), iter(model.resolve_tasks(task, len(texts), "texts")), len(texts)
    if task is not None and not isinstance(task, str):
        raise TypeError("with an iterator of texts, task must be one task name or None "
                        "(per-text tasks need a list of texts)")
    name = None if task is None else model.resolve_task(task)

    def checked():
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not a string")
            yield t
    return checked(), itertools.repeat(name), None


def iter_encode(model, texts, *, task=None, prompt=None, batch_size=32, max_length=None,
                truncate_dim=None, normalize=True, show_progress_bar=None,
                max_tokens_per_batch=DEFAULT_TOKEN_BUDGET,
                window=DEFAULT_WINDOW) -> Iterator[np.ndarray]:
    """One float32 [D] embedding per text of `texts` (any iterable of strings), in input order,
    holding at most two windows of `window` texts. Same arguments as `encode`."""
    cfg = model.config
    truncate_dim = cfg.truncate_dim if truncate_dim is None else truncate_dim
    max_length, dim = check_options(model, batch_size=batch_size, max_length=max_length,
                                    truncate_dim=truncate_dim,
                                    max_tokens_per_batch=max_tokens_per_batch, window=window)
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
    text_iter, task_iter, count = _texts_and_tasks(model, texts, task)
    limit = position_limit(cfg)

    def windows():
        while True:
            chunk = list(itertools.islice(text_iter, window))
            if not chunk:
                return
            tasks = list(itertools.islice(task_iter, len(chunk)))
            ids = token_ids(model.tokenizer, cfg, chunk, tasks, max_length, prompt)
            lengths = [len(x) for x in ids]
            yield ids, plan(lengths, tasks, limit, batch_size, max_tokens_per_batch,
                            model.row_multiple)

    show = show_progress_bar
    if show is None:  # on for long jobs only (an iterator's length is unknown: off)
        show = count is not None and count >= PROGRESS_MIN_BATCHES * batch_size
    with tqdm(total=count, disable=not show, file=sys.stderr, desc="encode", unit="text") as bar:
        in_flight: collections.deque = collections.deque()
        upcoming = windows()
        current = next(upcoming, None)
        while current is not None:
            ids, batches = current
            pooled = np.zeros((len(ids), cfg.hidden_size), np.float32)
            for batch in batches:
                rows = [ids[i] for i in batch.members]
                rows += [FILLER] * (batch.rows - len(rows))
                array, lengths = pad(rows, batch.width, cfg.pad_token_id)
                in_flight.append((pooled, batch.members, model.pooled(array, lengths, batch.task)))
                if len(in_flight) > IN_FLIGHT:
                    _collect(in_flight.popleft(), bar)
            # The next window is tokenized and planned while this one's last batches run.
            current = next(upcoming, None)
            while in_flight:
                _collect(in_flight.popleft(), bar)
            emb = pooled[:, :dim]
            if normalize:
                emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            yield from np.ascontiguousarray(emb, np.float32)


def _collect(entry, bar):
    pooled, members, result = entry
    pooled[list(members)] = np.asarray(result)[: len(members)]
    bar.update(len(members))
