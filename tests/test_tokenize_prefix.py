"""`tokenize.truncated_ids` tokenizes only a prefix of a long text; its ids must be exactly the
whole text's, truncated. Property-based (hypothesis) against the tokenizer run on the whole text,
on random Unicode: spaces of every kind, no-space scripts (Chinese, Thai), long words, combining
marks, Hangul, emoji sequences, added tokens written in the text, for four vocabularies (single
characters only, then n-grams up to 2 and 4 letters, and n-grams up to 3 of Chinese, Thai and
Latin letters, where pieces cross every position of a word without spaces) and the XLM-R
pipeline's shape (NFKC, runs of spaces collapsed, `<mask>` taking the space before it)."""

import itertools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from convert.random_checkpoint import write_tokenizer
from jina_jax.tokenize import Cutter, truncated_ids, without_lone_surrogates

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

WORDS = st.sampled_from([
    "hello", "world", "abcabcabc", "aaaaaaaa", "zzq", "ﬁne", "Ａｂｃ", "①②", "e\u0301", "é",
    "我们的世界", "東京都", "ภาษาไทย", "น้ำ", "\u0e33", "한국어", "\u1100\u1161\u11a8", "👍🏽", "🇫🇷",
    "👨\u200d👩", "\u0600", "\u0d4e", "<mask>", "<s>", "</s>", "<unk>", "<ma", "sk>", "▁",
    "x" * 300, "ab" * 150, "a\u0301" * 40, "٣٤٥", "Ω", "Ω", "\u00a0", "\u3000", "\t", "\n",
    "\r\n", " ", "  ", "     ", ".", "!?", "-", "\u200b", "\u00ad", "\ufeff", "x\u3000 ",
    "\u00a0 ", "\u0600 ", "\u2000 ", "\u00b4 ", "\ufdfa ", "ｘ ", "\u0301 "])
TEXT = st.lists(st.one_of(WORDS, st.text(max_size=12),
                          st.text(alphabet="abcdefgh ", min_size=20, max_size=200),
                          st.text(alphabet="我们东京ภาษาabc", min_size=20, max_size=200)),
                min_size=1, max_size=60).map("".join)


def _tokenizer(folder, vocab_size, xlmr):
    write_tokenizer(str(folder), vocab_size)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    if xlmr:
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                               normalizers.Replace(Regex(" {2,}"), " ")])
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    return tok


NGRAM_LETTERS = "我们东京的世界是不了ภาษาไทยabc"


def _ngram_tokenizer(letters=NGRAM_LETTERS, n=3, seed=0):
    """XLM-R's pipeline over every n-gram (up to `n`) of `letters`, with and without the word
    marker, scored as random_checkpoint's are (longer is rarer, a little noise): no position
    of a word made of these letters is free of crossing pieces."""
    rng = np.random.default_rng(seed)
    grams = ["".join(g) for k in range(1, n + 1) for g in itertools.product(letters, repeat=k)]
    pieces = ["\u2581"] + grams + ["\u2581" + g for g in grams if len(g) < n]
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = ([(t, 0.0) for t in specials]
             + [(p, -2.0 * len(p) - 3.0 * float(rng.random())) for p in pieces]
             + [("<mask>", 0.0)])
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens(specials + ["<mask>"])
    tok.no_padding()
    return tok


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    made = []
    for k, (size, xlmr) in enumerate([(120, False), (3000, True), (250002, False),
                                      (250002, True)]):
        folder = root / str(k)
        folder.mkdir()
        made.append(_tokenizer(folder, size, xlmr))
    made.append(_ngram_tokenizer())
    for tok in made:
        assert Cutter.of(tok) is not None  # the fast path is the one under test
    return made


def whole(tok, text, max_length):
    tok.enable_truncation(max_length)
    return tok.encode(text).ids


@SETTINGS
@given(texts=st.lists(TEXT, min_size=1, max_size=4), max_length=st.integers(2, 40),
       which=st.integers(0, 4))
def test_prefix_equals_whole(tokenizers, texts, max_length, which):
    tok = tokenizers[which]
    got = truncated_ids(tok, texts, max_length)
    for text, ids in zip(texts, got):
        assert ids.tolist() == whole(tok, text, max_length), (max_length, text)


@SETTINGS
@given(text=TEXT, which=st.integers(0, 4))
def test_every_accepted_cut_is_a_prefix(tokenizers, text, which):
    """The claim itself, at every position the cutter accepts (not only where truncation lands):
    the tokens of text[:cut] are the first tokens of the text's."""
    tok = tokenizers[which]
    cutter = Cutter.of(tok)
    tok.no_truncation()
    full = tok.encode(text).ids
    accepted = [c for c in range(1, len(text)) if cutter.cut(text, c - 1, c) == c]
    for cut in accepted[:: max(1, len(accepted) // 40)]:
        head = tok.encode(text[:cut]).ids[:-1]  # without the closing </s>
        assert full[:len(head)] == head, (cut, text)


NO_SPACE = st.lists(st.one_of(st.text(alphabet="abcdefgh", min_size=1, max_size=300),
                               st.text(alphabet=NGRAM_LETTERS, min_size=1, max_size=300),
                               st.sampled_from(["a" * 200, "ab" * 100, "我们" * 100, "<mask>",
                                                "e\u0301", "น้ำ", " ", "\u3000"])),
                     min_size=1, max_size=20).map("".join)


@SETTINGS
@given(text=NO_SPACE, which=st.integers(0, 4))
def test_every_accepted_window_decides(tokenizers, text, which):
    """The window's claim, at every window the cutter accepts: the tokens that all of its
    prefixes begin with are the first tokens of the whole text's."""
    tok = tokenizers[which]
    cutter = Cutter.of(tok)
    tok.no_truncation()
    full = tok.encode(text).ids
    longest = cutter.longest
    highs = range(2, len(text) // (2 * longest) + 1)  # beyond, a window costs too much
    windows = {cutter.window(text, high // 2, high) for high in highs}
    for ends in sorted((w for w in windows if w is not None), key=lambda w: w.start)[::3]:
        assert len(ends) == longest and ends.stop <= len(text)
        heads = [tok.encode(text[:e]).ids[:-1] for e in ends]  # without the closing </s>
        common = 0
        while all(len(h) > common and h[common] == heads[0][common] for h in heads):
            common += 1
        assert full[:common] == heads[0][:common], (ends, text)


@SETTINGS
@given(texts=st.lists(NO_SPACE, min_size=1, max_size=4), max_length=st.integers(2, 40),
       which=st.integers(0, 4))
def test_no_space_prefix_equals_whole(tokenizers, texts, max_length, which):
    tok = tokenizers[which]
    got = truncated_ids(tok, texts, max_length)
    for text, ids in zip(texts, got):
        assert ids.tolist() == whole(tok, text, max_length), (max_length, text)


def window_decides(tok, text, max_length=256) -> bool:
    """Whether `truncated_ids` takes this text's first prefix window: found, and its prefixes'
    first max_length tokens all agree."""
    high = 6 * max_length
    ends = Cutter.of(tok).window(text, high // 2, high)
    if ends is None:
        return False
    tok.enable_truncation(max_length)
    ids = [e.ids for e in tok.encode_batch([text[:e] for e in ends])]
    return all(len(x) == max_length and x == ids[0] for x in ids)


def test_long_texts_without_spaces_by_window(tokenizers):
    """65,536 characters with no space where every position is crossed by a piece (no cut):
    a window of prefixes decides them (random letters; Chinese and Thai in a vocabulary of
    their n-grams), equal to the whole text's tokens; a run of one letter, whose tokens depend
    on its length (ties), is tokenized whole and equal too."""
    rng = random.Random(0)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(65536))
    cjk = "".join(rng.choice(NGRAM_LETTERS[:10]) for _ in range(65536))
    thai = "".join(rng.choice("ภาษาไทย") for _ in range(65536))
    ngrams = tokenizers[4]
    for tok, text in ((tokenizers[2], letters), (tokenizers[3], "abcdefghij" * 6554),
                      (ngrams, cjk), (ngrams, thai)):
        assert Cutter.of(tok).cut(text, 768, 1536) is None
        assert window_decides(tok, text)
        assert truncated_ids(tok, [text], 256)[0].tolist() == whole(tok, text, 256)
    for tok in tokenizers:
        assert truncated_ids(tok, ["a" * 65536], 256)[0].tolist() == whole(tok, "a" * 65536, 256)


def test_long_texts_equal_and_cut(tokenizers):
    """The cases the cut is for: 65,536-character texts, with spaces, without (a cut inside a
    word where the vocabulary allows one) and ones with no cut at all (tokenized whole)."""
    spaced = ("the quick brown fox jumps over a lazy dog " * 2000)[:65536]
    nospace = "abcdefghij" * 6554
    for tok in tokenizers:
        for text in (spaced, nospace, "我们东京" * 16384, "a" * 65536):
            assert truncated_ids(tok, [text], 256)[0].tolist() == whole(tok, text, 256)
        assert Cutter.of(tok).cut(spaced, 768, 1536) is not None
    # Single-character pieces only: no piece crosses between two letters.
    assert Cutter.of(tokenizers[0]).cut(nospace, 768, 1536) is not None
    # Every pair of letters is a piece: no cut inside the word (tokenized whole).
    assert Cutter.of(tokenizers[2]).cut(nospace, 768, 1536) is None


def test_other_pipelines_tokenize_whole(tmp_path):
    """A pipeline the reasoning does not cover (here: a Replace that could span a cut) gets no
    cutter, and the whole text is tokenized, as before."""
    tok = _tokenizer(tmp_path, 120, False)
    tok.normalizer = normalizers.Replace("ab", "x")
    assert Cutter.of(tok) is None
    text = "ab " * 400
    assert truncated_ids(tok, [text], 8)[0].tolist() == whole(tok, text, 8)


def _surrogates_replaced(text: str) -> str:
    """The rule spelled out: a high surrogate then a low one is their character; any other
    surrogate is U+FFFD."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if "\ud800" <= c <= "\udbff" and i + 1 < len(text) and "\udc00" <= text[i + 1] <= "\udfff":
            out.append(chr(0x10000 + ((ord(c) - 0xD800) << 10) + ord(text[i + 1]) - 0xDC00))
            i += 2
            continue
        out.append("\ufffd" if "\ud800" <= c <= "\udfff" else c)
        i += 1
    return "".join(out)


@SETTINGS
@given(text=st.text(alphabet=st.sampled_from(["a", " ", "é", "我", "😀", "\uffff", "\U0010ffff",
                                              "\ud800", "\udbff", "\udc00", "\udfff",
                                              "\ud83d", "\ude00"]), max_size=30))
def test_lone_surrogates_replaced(text):
    assert without_lone_surrogates(text) == _surrogates_replaced(text)
    assert without_lone_surrogates("x" * 100 + text) == "x" * 100 + _surrogates_replaced(text)
