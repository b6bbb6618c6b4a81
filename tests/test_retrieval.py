"""Retrieval features on `encode`: query/document helpers, quantised outputs (against
sentence-transformers' own quantiser), token embeddings and late chunking (against a reference
computed here from the tokenizer's offsets and Transformers + PEFT hidden states)."""

import os

import numpy as np
import pytest
import torch
from sentence_transformers.quantization import quantize_embeddings
from tokenizers import Tokenizer

from jina_jax import JinaEmbeddingsV3
from jina_jax.late_chunking import best_window, sentence_spans, windows
from tests import reference as ref

TEXTS = ["The quick brown fox. It jumps!", "naïve café, Zürich — 東京", "short", "",
         "What is the capital of France?", "a b c d e f g h i j k l"]
DOC = "Hi there. Yes!\nOk? end"


@pytest.fixture(scope="module")
def model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


@pytest.fixture(scope="module")
def peft_passage(transformers_dir):
    return ref.peft_reference(transformers_dir, "retrieval_passage")


def test_query_and_document_helpers(model):
    np.testing.assert_array_equal(model.encode_query(TEXTS, truncate_dim=32),
                                  model.encode(TEXTS, task="retrieval.query", truncate_dim=32))
    np.testing.assert_array_equal(model.encode_document(TEXTS[0]),
                                  model.encode(TEXTS[0], task="retrieval.passage"))
    with pytest.raises(TypeError, match="encodes with task 'retrieval.query'"):
        model.encode_query(TEXTS, task="separation")


@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
@pytest.mark.parametrize("dim", [None, 32])
def test_quantised_equal_sentence_transformers(model, precision, dim):
    floats = model.encode(TEXTS, task="separation", truncate_dim=dim)
    ours = model.encode(TEXTS, task="separation", truncate_dim=dim, precision=precision)
    theirs = quantize_embeddings(floats, precision)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    if precision.endswith("int8"):  # with given ranges, and one text at a time (streaming)
        ranges = np.vstack([floats.min(0) - 0.1, floats.max(0) + 0.1])
        np.testing.assert_array_equal(
            model.encode(TEXTS, task="separation", truncate_dim=dim, precision=precision,
                         ranges=ranges),
            quantize_embeddings(floats, precision, ranges=ranges))
        streamed = np.stack(list(model.iter_encode(iter(TEXTS), task="separation",
                                                   truncate_dim=dim, precision=precision,
                                                   ranges=ranges)))
        np.testing.assert_array_equal(streamed, quantize_embeddings(floats, precision,
                                                                    ranges=ranges))


def test_quantised_bad_arguments(model):
    with pytest.raises(ValueError, match="precision must be one of"):
        model.encode(TEXTS, precision="int4")
    with pytest.raises(ValueError, match="int8 needs `ranges`"):
        model.encode("one text", precision="int8")
    with pytest.raises(ValueError, match=r"ranges must have shape \[2, 48\]"):
        model.encode(TEXTS, precision="uint8", ranges=np.zeros((2, 5)))
    # A dimension that is no multiple of 8 packs into a zero-padded last byte, as theirs does.
    floats = model.encode(TEXTS, truncate_dim=12)
    np.testing.assert_array_equal(model.encode(TEXTS, precision="binary", truncate_dim=12),
                                  quantize_embeddings(floats, "binary"))
    with pytest.raises(ValueError, match="a stream of int8 embeddings needs `ranges`"):
        next(model.iter_encode(iter(TEXTS), precision="int8"))


def test_token_embeddings_are_the_real_tokens_hidden_states(model, transformers_dir,
                                                            peft_passage):
    tok = Tokenizer.from_file(os.path.join(transformers_dir, "tokenizer.json"))
    tok.enable_truncation(24)
    out = model.encode(TEXTS, task="retrieval.passage", output_value="token_embeddings",
                       max_length=24, batch_size=4)
    assert isinstance(out, list) and len(out) == len(TEXTS)
    for text, got in zip(TEXTS, out):
        ids = tok.encode(ref.INSTRUCTIONS["retrieval.passage"] + text).ids
        assert got.dtype == np.float32 and got.shape == (len(ids), 48)
        ours_alone = model(np.array([ids]), np.ones((1, len(ids))), task="retrieval.passage")
        np.testing.assert_allclose(got, np.asarray(ours_alone.last_hidden_state)[0], atol=1e-5)
        with torch.no_grad():
            theirs = peft_passage(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
        np.testing.assert_allclose(got, theirs, atol=1e-4)
    single = model.encode("short", task="retrieval.passage", output_value="token_embeddings")
    np.testing.assert_array_equal(single, out[2])
    with pytest.raises(ValueError, match="output_value must be one of"):
        model.encode(TEXTS, output_value="cls")


def test_sentence_spans_cover_the_text():
    spans = sentence_spans(DOC)
    assert "".join(DOC[a:b] for a, b in spans) == DOC
    assert [DOC[a:b] for a, b in spans] == ["Hi there. ", "Yes!\n", "Ok? ", "end"]
    text = "One. Two!  Three?\n\nFour...x. y"
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "One. ", "Two!  ", "Three?\n\n", "Four...x. ", "y"]
    assert sentence_spans("no boundary") == [(0, 11)]
    assert sentence_spans("") == []


def test_windows_and_the_best_window():
    assert windows(10, 16, 4) == [(0, 10)]
    ranges = windows(20, 8, 3)
    assert ranges == [(0, 8), (5, 13), (10, 18), (12, 20)]
    best = best_window(20, ranges)
    for t, w in enumerate(best):
        a, b = ranges[w]
        margin = min(t - a, b - 1 - t)
        assert a <= t < b
        assert all(margin >= min(t - a2, b2 - 1 - t) for a2, b2 in ranges if a2 <= t < b2)


def _reference_chunks(hidden, encoding, text, n_prefix, spans, dim=None):
    """Chunk vectors from one sequence's states [T, H] and the tokenizer's offsets, computed
    here: a token belongs to the span holding its first non-space character."""
    vectors = []
    for start, end in spans:
        members = []
        for t, ((a, b), special) in enumerate(zip(encoding.offsets,
                                                  encoding.special_tokens_mask)):
            if special or a >= b:
                continue
            while a < b - 1 and text[a].isspace():
                a += 1
            if n_prefix + start <= a < n_prefix + end:
                members.append(t)
        v = hidden[members].mean(0)[:dim]
        vectors.append(v / np.linalg.norm(v))
    return np.stack(vectors)


def test_late_chunks_single_window_equal_reference(model, transformers_dir, peft_passage):
    tok = Tokenizer.from_file(os.path.join(transformers_dir, "tokenizer.json"))
    prefix = ref.INSTRUCTIONS["retrieval.passage"]
    encoding = tok.encode(prefix + DOC)
    assert len(encoding.ids) <= 38
    emb, spans = model.encode_late_chunks(DOC, max_length=38)
    assert spans == sentence_spans(DOC)
    ids = np.array([encoding.ids])
    ours_hidden = np.asarray(model(ids, np.ones_like(ids), task="retrieval.passage")
                             .last_hidden_state)[0]
    text, n = prefix + DOC, len(prefix)
    np.testing.assert_allclose(emb, _reference_chunks(ours_hidden, encoding, text, n, spans),
                               atol=1e-5)  # exactly the single-forward result
    with torch.no_grad():
        theirs = peft_passage(input_ids=torch.from_numpy(ids)).last_hidden_state[0].numpy()
    np.testing.assert_allclose(emb, _reference_chunks(theirs, encoding, text, n, spans),
                               atol=1e-4)
    # Caller's spans, Matryoshka truncation, and fixed token chunks.
    given = [(0, 8), (10, 14), (15, len(DOC))]
    emb2, spans2 = model.encode_late_chunks([DOC], spans=[given], truncate_dim=16,
                                            max_length=38)[0]
    assert spans2 == given
    np.testing.assert_allclose(emb2, _reference_chunks(ours_hidden, encoding, text, n, given, 16),
                               atol=1e-5)
    _, token_spans = model.encode_late_chunks(DOC, chunk_tokens=5, max_length=38)
    assert token_spans[0][0] == 0 and token_spans[-1][1] == len(DOC)


def test_late_chunks_across_windows_use_the_best_window(model, transformers_dir):
    """A document longer than max_length: windows of the instruction + a slice of the document,
    each token's state from its best window; computed here with the model's own forward."""
    doc = " ".join(f"w{i}." for i in range(12))
    tok = Tokenizer.from_file(os.path.join(transformers_dir, "tokenizer.json"))
    prefix = ref.INSTRUCTIONS["retrieval.passage"]
    encoding = tok.encode(prefix + doc)
    ids = np.array(encoding.ids)
    n_head = 1 + len(tok.encode(prefix, add_special_tokens=False).ids)
    body = ids[n_head:-1]
    capacity, overlap = 20 - n_head - 1, 4
    ranges = windows(len(body), capacity, overlap)
    assert len(ranges) >= 3
    states = []
    for a, b in ranges:
        row = np.concatenate([ids[:n_head], body[a:b], ids[-1:]])[None]
        states.append(np.asarray(model(row, np.ones_like(row), task="retrieval.passage")
                                 .last_hidden_state)[0])
    best = best_window(len(body), ranges)
    hidden = np.zeros((len(ids), 48), np.float32)
    for t, w in enumerate(best):
        hidden[n_head + t] = states[w][n_head + t - ranges[w][0]]
    spans = sentence_spans(doc)
    expected = _reference_chunks(hidden, encoding, prefix + doc, len(prefix), spans)
    emb, got_spans = model.encode_late_chunks(doc, max_length=20, overlap=overlap,
                                              batch_size=2)
    assert got_spans == spans
    np.testing.assert_allclose(emb, expected, atol=1e-5)


def test_late_chunks_mixed_tasks_and_bad_arguments(model):
    both = model.encode_late_chunks([DOC, DOC], task=["retrieval.passage", "separation"],
                                    max_length=38)
    alone = model.encode_late_chunks(DOC, task="separation", max_length=38)
    np.testing.assert_allclose(both[1][0], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"spans\[0\]: span 1 \(5, 20\) starts before span 0"):
        model.encode_late_chunks(DOC, spans=[(0, 10), (5, 20)], max_length=38)
    with pytest.raises(ValueError, match=r"spans\[0\]: span 0 \(0, 999\) is empty or outside"):
        model.encode_late_chunks(DOC, spans=[(0, 999)], max_length=38)
    with pytest.raises(ValueError, match=r"chunk 1 \(characters 2\.\.3\) has no token"):
        model.encode_late_chunks("aa bb", spans=[(0, 2), (2, 3), (3, 5)], max_length=38)
    with pytest.raises(ValueError, match="overlap must be in"):
        model.encode_late_chunks(DOC, max_length=20, overlap=50)
    with pytest.raises(ValueError, match="give spans or chunk_tokens, not both"):
        model.encode_late_chunks(DOC, spans=[(0, 3)], chunk_tokens=3, max_length=38)
    with pytest.raises(ValueError, match="unknown task"):
        model.encode_late_chunks(DOC, task="nope", max_length=38)
