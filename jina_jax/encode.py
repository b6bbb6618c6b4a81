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

import os
import sys
import warnings
from collections import defaultdict

import numpy as np

BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DEFAULT_MAX_LENGTH = 8192
DEFAULT_TOKEN_BUDGET = 16384
PROGRESS_MIN_BATCHES = 10
# A filler row for incomplete batches: "<s></s>", two real tokens, so nothing divides by zero.
_FILLER = (0, 2)


def load_tokenizer(folder: str | None):
    from tokenizers import Tokenizer

    path = os.path.join(folder or "", "tokenizer.json")
    if folder is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json next to the checkpoint; encode() "
                                "needs one (convert copies it, random-checkpoint writes one)")
    tok = Tokenizer.from_file(path)
    tok.no_padding()
    return tok


def position_limit(cfg) -> int:
    """Usable tokens: the release's 8194 positions carry two XLM-R offsets, leaving 8192."""
    return cfg.max_position_embeddings - 2


def bucket_for(length: int, limit: int) -> int:
    for b in BUCKETS:
        if length <= b and b <= limit:
            return b
    return limit


def rows_for(bucket: int, count: int, batch_size: int, token_budget: int) -> int:
    cap = max(1, min(batch_size, token_budget // bucket))
    return min(cap, 1 << max(0, count - 1).bit_length())


def _check_texts(texts):
    if texts is None or isinstance(texts, (bytes, dict)) or not hasattr(texts, "__len__"):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not a string")


def encode(model, texts, *, task=None, prompt=None, batch_size=32, max_length=None,
           truncate_dim=None, normalize=True, show_progress_bar=None,
           max_tokens_per_batch=DEFAULT_TOKEN_BUDGET):
    """See `JinaEmbeddingsV3.encode`."""
    cfg = model.config
    single = isinstance(texts, str)
    texts = [texts] if single else texts
    _check_texts(texts)
    limit = position_limit(cfg)
    max_length = min(DEFAULT_MAX_LENGTH, limit) if max_length is None else max_length
    if not isinstance(max_length, int) or not 2 <= max_length <= limit:
        raise ValueError(f"max_length must be an integer in 2..{limit} (the model's position "
                         f"limit), got {max_length!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    truncate_dim = cfg.truncate_dim if truncate_dim is None else truncate_dim
    if truncate_dim is not None:
        if not isinstance(truncate_dim, int) or not 1 <= truncate_dim <= cfg.hidden_size:
            raise ValueError(f"truncate_dim must be in 1..{cfg.hidden_size}, got {truncate_dim!r}")
        if truncate_dim not in cfg.matryoshka_dimensions:
            warnings.warn(f"truncate_dim={truncate_dim} is not one of the dimensions the model was "
                          f"trained for {list(cfg.matryoshka_dimensions)}")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
    row_tasks = model.resolve_tasks(task, len(texts), "texts")
    dim = truncate_dim or cfg.hidden_size
    if not texts:
        return np.zeros((0, dim), np.float32)

    prompts = [prompt if prompt is not None else ("" if t is None else cfg.instruction(t))
               for t in row_tasks]
    tokenizer = model.tokenizer
    tokenizer.enable_truncation(max_length)
    encodings = tokenizer.encode_batch([p + t for p, t in zip(prompts, texts)])
    ids = [e.ids for e in encodings]

    plan = _plan(ids, row_tasks, limit, batch_size, max_tokens_per_batch, model.row_multiple)
    show = len(plan) >= PROGRESS_MIN_BATCHES if show_progress_bar is None else show_progress_bar
    pooled = np.zeros((len(texts), cfg.hidden_size), np.float32)
    from tqdm.auto import tqdm

    with tqdm(total=len(texts), disable=not show, file=sys.stderr, desc="encode",
              unit="text") as bar:
        for name, bucket, rows, members in plan:
            batch = np.ones((rows, bucket), np.int32) * cfg.pad_token_id
            lengths = np.zeros((rows,), np.int32)
            for r in range(rows):
                tokens = ids[members[r]] if r < len(members) else _FILLER
                batch[r, : len(tokens)] = tokens
                lengths[r] = len(tokens)
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


def tokenize(model, texts, task=None, *, max_length: int | None = None,
             prompt: str | None = None):
    """(ids int32 [N, bucket], lengths int32 [N]): texts with the task's instruction, as `encode`
    tokenizes them, right-padded to the bucket of the longest (so shapes come from a small set).
    This is what the training batches are made of. max_length defaults to 512 (or the model's
    limit, if lower)."""
    cfg = model.config
    _check_texts(texts)
    limit = position_limit(cfg)
    max_length = min(512, limit) if max_length is None else max_length
    if not isinstance(max_length, int) or not 2 <= max_length <= limit:
        raise ValueError(f"max_length must be an integer in 2..{limit}, got {max_length!r}")
    name = None if task is None else model.resolve_task(task)
    prefix = prompt if prompt is not None else ("" if name is None else cfg.instruction(name))
    tokenizer = model.tokenizer
    tokenizer.enable_truncation(max_length)
    encoded = [e.ids for e in tokenizer.encode_batch([prefix + t for t in texts])]
    width = bucket_for(max((len(e) for e in encoded), default=2), limit)
    ids = np.full((len(texts), width), cfg.pad_token_id, np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for i, tokens in enumerate(encoded):
        ids[i, : len(tokens)] = tokens
        lengths[i] = len(tokens)
    return ids, lengths
