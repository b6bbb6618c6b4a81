"""Texts in, embeddings out, as the release's `encode` computes them:

    instruction + text -> tokenizer (truncate at max_length, `<s> ... </s>` kept)
      -> encoder with the task's adapter -> mean pool over real tokens
      -> Matryoshka truncation -> L2 normalisation -> float32 [N, D] in input order

For speed, texts are grouped by task, sorted by length and cut into batches whose shapes come
from a small fixed set: the length is padded up to a bucket, the row count to a power of two
capped by `batch_size` and by a token budget. Every shape compiles once and is reused, so the
number of compilations is bounded by the buckets touched, and a repeat call compiles nothing.
"""

from __future__ import annotations

import sys
import warnings
from collections import defaultdict

import numpy as np
from tqdm.auto import tqdm

from .tokenize import bucket_for, check_max_length, check_texts, pad, position_limit, token_ids

DEFAULT_MAX_LENGTH = 8192
DEFAULT_TOKEN_BUDGET = 16384
PROGRESS_MIN_BATCHES = 10
# A filler row for incomplete batches: "<s></s>", two real tokens, so nothing divides by zero.
FILLER = [0, 2]


def rows_for(bucket: int, count: int, batch_size: int, token_budget: int) -> int:
    cap = max(1, min(batch_size, token_budget // bucket))
    return min(cap, 1 << max(0, count - 1).bit_length())


def encode(model, texts, *, task=None, prompt=None, batch_size=32, max_length=None,
           truncate_dim=None, normalize=True, show_progress_bar=None,
           max_tokens_per_batch=DEFAULT_TOKEN_BUDGET):
    """See `JinaEmbeddingsV3.encode`."""
    cfg = model.config
    single = isinstance(texts, str)
    texts = [texts] if single else texts
    check_texts(texts)
    limit = position_limit(cfg)
    max_length = check_max_length(max_length, cfg, DEFAULT_MAX_LENGTH)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    truncate_dim = cfg.truncate_dim if truncate_dim is None else truncate_dim
    if truncate_dim is not None:
        if not isinstance(truncate_dim, int) or not 1 <= truncate_dim <= cfg.hidden_size:
            raise ValueError(f"truncate_dim must be in 1..{cfg.hidden_size}, got {truncate_dim!r}")
        if truncate_dim not in cfg.matryoshka_dimensions:
            warnings.warn(f"truncate_dim={truncate_dim} is not one of the dimensions the model was "
                          f"trained for {list(cfg.matryoshka_dimensions)}")
    row_tasks = model.resolve_tasks(task, len(texts), "texts")
    dim = truncate_dim or cfg.hidden_size
    if not texts:
        return np.zeros((0, dim), np.float32)

    ids = token_ids(model.tokenizer, cfg, texts, row_tasks, max_length, prompt)

    plan = _plan(ids, row_tasks, limit, batch_size, max_tokens_per_batch, model.row_multiple)
    show = len(plan) >= PROGRESS_MIN_BATCHES if show_progress_bar is None else show_progress_bar
    pooled = np.zeros((len(texts), cfg.hidden_size), np.float32)
    with tqdm(total=len(texts), disable=not show, file=sys.stderr, desc="encode",
              unit="text") as bar:
        for name, bucket, rows, members in plan:
            rows_ids = [ids[m] for m in members] + [FILLER] * (rows - len(members))
            batch, lengths = pad(rows_ids, bucket, cfg.pad_token_id)
            out = model.pooled(batch, lengths, name)
            pooled[members] = np.asarray(out)[: len(members)]
            bar.update(len(members))

    emb = pooled[:, :dim]
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    emb = np.ascontiguousarray(emb, np.float32)
    return emb[0] if single else emb


def _plan(ids, row_tasks, limit, batch_size, token_budget, row_multiple=1):
    """[(task, bucket, rows, member indices)]: every batch's shape is (rows, bucket)."""
    groups = defaultdict(list)
    for i, (tokens, task) in enumerate(zip(ids, row_tasks)):
        groups[(task or "", bucket_for(len(tokens), limit))].append(i)
    plan = []
    # Largest buckets first: a shape that cannot fit in memory fails before any work is done.
    for (task, bucket), members in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        members.sort(key=lambda i: -len(ids[i]))
        rows = rows_for(bucket, len(members), batch_size, token_budget)
        rows = -(-rows // row_multiple) * row_multiple  # every device gets rows
        for start in range(0, len(members), rows):
            plan.append((task or None, bucket, rows, members[start:start + rows]))
    return plan
