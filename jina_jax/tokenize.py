"""Texts -> token ids, as the release's `encode` tokenizes them: the task's instruction
prepended, `<s> ... </s>` added, truncated at `max_length` tokens (specials included). One path
for `encode` and for training batches; each caller keeps its own default `max_length`.
"""

from __future__ import annotations

import os
import re

import numpy as np
from tokenizers import Tokenizer



def ladder(per_octave: int, start: float = 64.0, below=range(4, 65, 4)) -> tuple[int, ...]:
    """`below`, then `per_octave` rungs an octave from `start` to 8192 (rounded up to multiples
    of 8, of 16 past 256, of 64 past 512)."""
    widths, x = set(below), start
    while x < 8192:
        x *= 2 ** (1 / per_octave)
        step = 8 if x <= 256 else 16 if x <= 512 else 64
        widths.add(min(8192, -(-int(x) // step) * step))
    return tuple(sorted(widths))


# Padded lengths: a batch's width is the smallest rung that holds its longest text. `encode` uses
# the fine ladder (84 widths; padding under 5% of real tokens on the benchmark's mixed corpus);
# training batches use powers of two, as every width there costs a compile of the forward and
# the backward.
WIDTHS = ladder(12)
BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# The server compiles every shape before it answers: three rungs an octave from 16 keep that
# set small (about 12% padding on short mixed texts, against 50-70% for powers of two).
SERVE_WIDTHS = ladder(3, 16.0, (16,))


def load_tokenizer(folder: str | None) -> Tokenizer:
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


def bucket_for(length: int, limit: int, ladder: tuple[int, ...] = BUCKETS) -> int:
    """The smallest rung of `ladder` that holds `length` tokens, within the model's limit."""
    for b in ladder:
        if length <= b and b <= limit:
            return b
    return limit


def check_texts(texts) -> None:
    if texts is None or isinstance(texts, (str, bytes, dict)) or not hasattr(texts, "__len__"):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not a string")


def check_max_length(max_length, cfg, default: int) -> int:
    """`max_length`, or `default` capped at the model's limit when None; checked."""
    limit = position_limit(cfg)
    max_length = min(default, limit) if max_length is None else max_length
    if not isinstance(max_length, int) or isinstance(max_length, bool) \
            or not 2 <= max_length <= limit:
        raise ValueError(f"max_length must be an integer in 2..{limit} (the model's position "
                         f"limit), got {max_length!r}")
    return max_length


def token_ids(tokenizer: Tokenizer, cfg, texts, row_tasks, max_length: int,
              prompt: str | None = None) -> list[np.ndarray]:
    """Token ids (int32) per text: `prompt` (default: each row's task instruction; none for a
    None task) + text, through the tokenizer's batch API."""
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
    prefixes = [prompt if prompt is not None else ("" if t is None else cfg.instruction(t))
                for t in row_tasks]
    tokenizer.enable_truncation(max_length)
    inputs = [without_lone_surrogates(p + t) for p, t in zip(prefixes, texts)]
    return [np.asarray(e.ids, np.int32) for e in tokenizer.encode_batch(inputs)]


_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """`text` with each lone UTF-16 surrogate (which JSON escapes like "\\ud800" can produce,
    and which no tokenizer accepts) replaced by U+FFFD; paired ones become their character."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def pad(ids: list, width: int, pad_id: int):
    """(ids int32 [N, width], lengths int32 [N]): right-padded rows."""
    out = np.full((len(ids), width), pad_id, np.int32)
    lengths = np.zeros((len(ids),), np.int32)
    for i, tokens in enumerate(ids):
        out[i, : len(tokens)] = tokens
        lengths[i] = len(tokens)
    return out, lengths


def tokenize(model, texts, task=None, *, max_length: int | None = None,
             prompt: str | None = None):
    """(ids int32 [N, bucket], lengths int32 [N]): texts with the task's instruction, as `encode`
    tokenizes them, right-padded to the bucket of the longest (so shapes come from a small set).
    This is what training batches are made of. max_length defaults to 512 (or the model's
    limit, if lower)."""
    cfg = model.config
    check_texts(texts)
    max_length = check_max_length(max_length, cfg, 512)
    name = None if task is None else model.resolve_task(task)
    ids = token_ids(model.tokenizer, cfg, texts, [name] * len(texts), max_length, prompt)
    width = bucket_for(max((len(e) for e in ids), default=2), position_limit(cfg))
    return pad(ids, width, cfg.pad_token_id)
