"""Texts -> token ids, as the release's `encode` tokenizes them: the task's instruction
prepended, `<s> ... </s>` added, truncated at `max_length` tokens (specials included). One path
for `encode` and for training batches; each caller keeps its own default `max_length`.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import weakref
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer


def ladder(
    per_octave: int, start: float = 64.0, below: Iterable[int] = range(4, 65, 4)
) -> tuple[int, ...]:
    """`below`, then `per_octave` rungs an octave from `start` to 8192 (rounded up to multiples
    of 8, of 16 past 256, of 64 past 512)."""
    widths, x = set(below), start
    while x < 8192:
        x *= 2 ** (1 / per_octave)
        step = 8 if x <= 256 else 16 if x <= 512 else 64
        widths.add(min(8192, -(-int(x) // step) * step))
    return tuple(sorted(widths))


# Padded lengths: a batch's width is the smallest rung that holds its longest text. `encode` uses
# the fine ladder (92 widths from 4; padding under 5% of real tokens on the benchmark's mixed corpus);
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
        raise FileNotFoundError(
            f"{path}: no tokenizer.json next to the checkpoint; encode() "
            "needs one (convert copies it, random-checkpoint writes one)"
        )
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
    if (
        not isinstance(max_length, int)
        or isinstance(max_length, bool)
        or not 2 <= max_length <= limit
    ):
        raise ValueError(
            f"max_length must be an integer in 2..{limit} (the model's position "
            f"limit), got {max_length!r}"
        )
    return max_length


def token_ids(
    tokenizer: Tokenizer, cfg, texts, row_tasks, max_length: int, prompt: str | None = None
) -> list[np.ndarray]:
    """Token ids (int32) per text: `prompt` (default: each row's task instruction; none for a
    None task) + text, through the tokenizer's batch API."""
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
    prefixes = [
        prompt if prompt is not None else ("" if t is None else cfg.instruction(t))
        for t in row_tasks
    ]
    inputs = [without_lone_surrogates(p + t) for p, t in zip(prefixes, texts)]
    return truncated_ids(tokenizer, inputs, max_length)


# --- Tokenizing no more of a text than max_length can need -----------------------------------
#
# The tokenizer tokenizes a text whole, then truncates: a 65,536-character text costs its ~20k
# tokens (kept as the encoding's overflow) to give 512. `truncated_ids` hands it a prefix
# instead, cut where the prefix's tokens are provably the whole text's first tokens, and takes
# the prefix's ids once it has at least max_length (so it held enough tokens):
#  - at a space (U+0020) after a "plain" character. The supported pipelines (XLM-R's: added
#    tokens matched in the raw text, a normalizer of NFC/NFKC/Precompiled and space-run
#    collapsing, Metaspace splitting at spaces, Unigram on each word alone) treat the two sides
#    of such a space independently: no normalization composes or reorders across it (a space
#    is a starter and composes with nothing; a plain character is a stable starter that starts
#    no grapheme with its successor), the prefix's last word ends there in both, and each word
#    is tokenized alone.
#  - inside a word (texts without spaces: Chinese, Thai, one long word), at a position that no
#    vocabulary piece crosses, with plain characters (normalized to themselves) for a longest
#    piece's length on each side: every segmentation of the word has a boundary there, and
#    Unigram's Viterbi pass is causal, so the prefix's segmentation is the whole word's up to
#    it, ties included. (A run of unknown characters cut there ends the prefix with `<unk>`,
#    the id the whole run fuses to.)
#  - inside a word where pieces do cross (one long word, CJK or Thai with a vocabulary of
#    their n-grams): a window of L = longest-piece consecutive positions, plain characters
#    around all of them. Every segmentation of the whole word has a boundary in the window
#    (no piece jumps over L positions), so the whole word's best path, up to its last boundary
#    w there, is the best path to w (Viterbi's backtrace from w; ties broken by the same
#    causal pass), which is what the tokenizer gives for text[:w]. All L prefixes are
#    tokenized: when their first max_length tokens agree, those are the whole text's whatever
#    w is. When they disagree (a run like "aaaa...", where the text's length decides where
#    the ties fall), the text is tokenized whole.
# A prefix that had too few tokens is followed by one twice as long only while that is at most
# a quarter of the text, and a window's L prefixes are tried only while they add up to at most
# half of it: a text tokenized whole after all (too few tokens in every prefix, or a window
# that disagrees) costs at most about twice what tokenizing it whole does.
#  - near an added token (`<mask>`, ...) no cut is made.
# A text with no such cut within reach (or a tokenizer of another kind) is tokenized whole, as
# before. `tests/test_tokenize_prefix.py` checks the equality on random Unicode against the
# whole text.

FIRST_REACH = 6  # characters per max_length token tried first; doubled until enough
_PLAIN_CATEGORIES = frozenset("Lu Ll Lt Lm Lo Nd Nl Pc Pd Ps Pe Pi Pf Po Sm Sc".split())
# Never a cut's neighbour: Hangul (its jamo compose), the grapheme Prepend and SpacingMark
# letters, the half-width sound marks (grapheme extenders), and Metaspace's own "▁".
_JOINING = re.compile(
    "[\u0d4e\u0e33\u0eb3\u1100-\u11ff\u3130-\u318f\ua960-\ua97f"
    "\uac00-\ud7ff\uff9e\uff9f\u2581\U000111c2\U000111c3\U0001193f"
    "\U00011941\U00011a3a\U00011a84-\U00011a89\U00011d46\U00011f02]"
)
_CUT_TRIES = 64  # candidate positions looked at per reach


def _local_normalizer(spec) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_local_normalizer(n) for n in spec.get("normalizers", ()))
    if kind == "Replace":  # XLM-R's: runs of spaces become one
        return spec.get("pattern") == {"Regex": " {2,}"} and spec.get("content") == " "
    return kind in ("NFC", "NFKC", "Precompiled")


class Cutter:
    """Where a text can be cut for `tokenizer` (see above); `Cutter.of(tokenizer)` is None for
    a tokenizer whose pipeline is not one this reasoning covers."""

    _known: weakref.WeakKeyDictionary[Tokenizer, list] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> Cutter | None:
        known = cls._known.get(tokenizer)
        if known is None:  # a list: the Cutter holds no reference back to its key
            known = cls._known[tokenizer] = [cls._make(tokenizer)]
        return known[0]

    @classmethod
    def _make(cls, tokenizer: Tokenizer) -> Cutter | None:
        if type(tokenizer.model).__name__ != "Unigram" or tokenizer.pre_tokenizer is None:
            return None
        pre = json.loads(tokenizer.pre_tokenizer.__getstate__())
        if (
            pre.get("type") != "Metaspace"
            or not pre.get("split", True)
            or pre.get("replacement") != "\u2581"
        ):
            return None
        norm = tokenizer.normalizer
        if not _local_normalizer(None if norm is None else json.loads(norm.__getstate__())):
            return None
        added = [t for t in tokenizer.get_added_tokens_decoder().values()]
        if any(t.normalized for t in added):  # matched after normalization: not in raw text
            return None
        return cls(tokenizer, [t.content for t in added])

    def __init__(self, tokenizer: Tokenizer, added: list[str]):
        vocab = tokenizer.get_vocab()
        self.pieces = frozenset(vocab)
        self.longest = max(map(len, vocab))
        self.added = tuple(a for a in added if a)
        self.added_reach = max(map(len, self.added), default=0)
        norm = tokenizer.normalizer
        self.normalize = norm.normalize_str if norm is not None else (lambda text: text)
        self._plain: dict[str, bool] = {}

    def plain(self, ch: str) -> bool:
        """A stable starter that the normalizer keeps as it is and that joins no neighbour."""
        known = self._plain.get(ch)
        if known is None:
            known = (
                unicodedata.category(ch) in _PLAIN_CATEGORIES
                and unicodedata.combining(ch) == 0
                and _JOINING.match(ch) is None
                and unicodedata.is_normalized("NFKC", ch)
                and self.normalize(ch) == ch
            )
            self._plain[ch] = known
        return known

    def _near_added(self, text: str, cut: int) -> bool:
        reach = self.added_reach + 1
        window = text[max(0, cut - reach) : cut + reach]
        return any(a in window for a in self.added)

    def _word_cut(self, text: str, j: int) -> bool:
        n, pieces = self.longest, self.pieces
        if j - n < 0 or j + n > len(text):
            return False
        for size in range(2, n + 1):  # short pieces first: most crossings show there
            for a in range(j - size + 1, j):
                if text[a : a + size] in pieces:
                    return False
        return all(map(self.plain, text[j - n : j + n])) and not self._near_added(text, j)

    def window(self, text: str, low: int, high: int) -> range | None:
        """Prefix ends m - L + 1..m (L: the longest piece), m in (low, high], the latest
        found: L consecutive positions inside one word, plain characters from one before the
        first to one after the last (so the word goes on past them), no added token near; or
        None. Only while L prefixes of `high` characters cost at most half the whole text."""
        n = self.longest
        if 2 * n * high > len(text):
            return None
        run, last = 0, min(high + 1, len(text) - 1)
        for j in range(last, max(0, low - n - 1) - 1, -1):  # text[j] leftwards
            run = run + 1 if self.plain(text[j]) else 0
            if run >= n + 3:  # text[j : j + n + 3] plain: the window m - n + 1..m, m = j + n + 1
                m = j + n + 1
                if m <= low:
                    return None
                reach = self.added_reach + 1
                around = text[max(0, j - reach) : j + n + 3 + reach]
                if not any(a in around for a in self.added):
                    return range(m - n + 1, m + 1)
        return None

    def cut(self, text: str, low: int, high: int) -> int | None:
        """A cut position in (low, high] (the prefix is text[:cut]), the latest found, or None."""
        b, tries = high + 1, 0
        while tries < _CUT_TRIES:
            b = text.rfind(" ", low + 1, b)
            if b <= 0:
                break
            tries += 1
            if self.plain(text[b - 1]) and not self._near_added(text, b):
                return b
        for j in range(high, max(low, high - _CUT_TRIES), -1):
            if self._word_cut(text, j):
                return j
        return None


def truncated_ids(tokenizer: Tokenizer, inputs: list[str], max_length: int) -> list[np.ndarray]:
    """Each input's token ids (int32), truncated at `max_length` with the tokenizer's specials:
    exactly the whole input's, tokenizing only a prefix where that is provably the same."""
    cutter = Cutter.of(tokenizer)
    out: list = [None] * len(inputs)
    reach = {i: FIRST_REACH * max_length for i in range(len(inputs))}
    while reach:
        # (index, prefix ends): one end is a proven cut; several are a window (see above).
        whole, cuts = [], []
        for i in list(reach):
            text = inputs[i]
            while True:
                if cutter is None or len(text) <= reach[i]:
                    whole.append(i)
                    del reach[i]
                    break
                low, high = reach[i] // 2, reach[i]
                cut = cutter.cut(text, low, high)
                ends = [cut] if cut is not None else cutter.window(text, low, high)
                if ends is not None:
                    cuts.append((i, ends))
                    break
                reach[i] *= 2
        tokenizer.enable_truncation(max_length)
        if whole:
            for i, e in zip(whole, tokenizer.encode_batch([inputs[i] for i in whole])):
                out[i] = np.asarray(e.ids, np.int32)
        if cuts:
            encoded = iter(
                tokenizer.encode_batch([inputs[i][:e] for i, ends in cuts for e in ends])
            )
            for i, ends in cuts:
                ids = [next(encoded).ids for _ in ends]
                if any(len(x) < max_length for x in ids):  # too few tokens: further, if cheap
                    reach[i] = reach[i] * 2 if 8 * reach[i] <= len(inputs[i]) else len(inputs[i])
                elif all(x == ids[0] for x in ids):  # the prefix's tokens are the text's
                    out[i] = np.asarray(ids[0], np.int32)
                    del reach[i]
                else:  # the window's prefixes disagree: the rest of the text decides
                    reach[i] = len(inputs[i])
    return out


def without_lone_surrogates(text: str) -> str:
    """`text` with each lone UTF-16 surrogate (which JSON escapes like "\\ud800" can produce,
    and which no tokenizer accepts) replaced by U+FFFD; paired ones become their character."""
    if text.isascii():  # a flag of the string in CPython: free for the common case
        return text
    try:  # a scan in C, unlike the regular expression (1.4 ms per 65,536 characters)
        text.encode("utf-8")
    except UnicodeEncodeError:  # UTF-8 can encode every code point but the surrogates
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def pad(ids: list, width: int, pad_id: int):
    """(ids int32 [N, width], lengths int32 [N]): right-padded rows."""
    out = np.full((len(ids), width), pad_id, np.int32)
    lengths = np.zeros((len(ids),), np.int32)
    for i, tokens in enumerate(ids):
        out[i, : len(tokens)] = tokens
        lengths[i] = len(tokens)
    return out, lengths


def tokenize(model, texts, task=None, *, max_length: int | None = None, prompt: str | None = None):
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
