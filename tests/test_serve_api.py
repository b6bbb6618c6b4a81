"""`jina-jax serve` as the Jina Embeddings API and TEI's /tokenize: live servers on 127.0.0.1
(tests/test_serve.py's `Server`), every field and encoding checked against `encode()` with the
same options (packed types bit for bit), against `model.tokenizer`, and every unknown or
conflicting field refused with a 400 naming it."""

import base64

import numpy as np
import pytest

from jina_jax import JinaEmbeddingsV3
from jina_jax.api import int8_ranges

from .test_serve import Server, sample_text, vectors

pytest.importorskip("starlette", reason="the [serve] extra is not installed")
openai = pytest.importorskip("openai", reason="the [test] extra is not installed")

MAX_LENGTH = 24


@pytest.fixture(scope="module")
def model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


@pytest.fixture(scope="module")
def server(transformers_dir):
    srv = Server(transformers_dir, "--max-batch-size", "8", "--max-length", str(MAX_LENGTH),
                 "--max-inputs", "8", "--max-input-chars", "400")
    yield srv
    assert srv.stop() == 0


def texts_of_length(model, task, lengths):
    """Texts whose token counts (instruction and <s>/</s> included) are `lengths` exactly."""
    instruction = model.config.instruction(task) if task else ""
    out = []
    for want in lengths:
        words = []
        while True:
            text = " ".join(words)
            count = len(model.tokenizer.encode(instruction + text).ids) if words else 0
            if count >= want:
                break
            words.append("ab")
        # "ab" is one or two tokens: trim characters until the count is exact.
        while len(model.tokenizer.encode(instruction + text).ids) > want:
            text = text[:-1]
        assert len(model.tokenizer.encode(instruction + text).ids) == want, (want, text)
        out.append(text)
    return out


def test_jina_fields_equal_encode(server, model):
    texts = [sample_text(i) for i in range(5)]
    kwargs = dict(task="retrieval.passage", max_length=MAX_LENGTH)
    # Jina's {"text": ...} objects, mixed with plain strings; dimensions and normalized.
    status, _, out = server.request("POST", "/embeddings", {
        "model": "jina-embeddings-v3", "task": "retrieval.passage",
        "input": [{"text": t} if i % 2 else t for i, t in enumerate(texts)],
        "dimensions": 16, "normalized": False, "embedding_type": "float"})
    assert status == 200, out
    np.testing.assert_allclose(vectors(out), model.encode(texts, truncate_dim=16,
                                                          normalize=False, **kwargs), atol=1e-5)
    tokens = sum(len(model.tokenizer.encode("P: " + t).ids[:MAX_LENGTH]) for t in texts)
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    floats = model.encode(texts, **kwargs)
    for kind in ("binary", "ubinary", "int8", "uint8"):
        status, out = server.post({"input": texts, "task": "retrieval.passage",
                                   "embedding_type": kind})
        assert status == 200, (kind, out)
        got = np.array([d["embedding"] for d in out["data"]])
        ranges = int8_ranges(floats.shape[1]) if kind.endswith("int8") else None
        expected = model.encode(texts, precision=kind, ranges=ranges, **kwargs)
        assert got.shape == expected.shape, kind
        np.testing.assert_array_equal(got, expected.astype(np.int64), err_msg=kind)
        # The packed bytes are the float answer's signs, so the float answers agree too.
        if kind.endswith("binary"):
            assert got.shape[1] == -(-floats.shape[1] // 8)
    # base64, asked for either way: little-endian float32.
    for field in ("embedding_type", "encoding_format"):
        status, out = server.post({"input": texts, "task": "retrieval.passage", field: "base64"})
        assert status == 200
        got = np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                        for d in out["data"]])
        np.testing.assert_allclose(got, floats, atol=1e-5)
    # Agreeing spellings are fine.
    assert server.post({"input": "x", "embedding_type": "float",
                        "encoding_format": "float"})[0] == 200


def test_truncate_both_ways(server, model):
    short, exact, over = texts_of_length(model, "retrieval.query", (10, MAX_LENGTH,
                                                                    MAX_LENGTH + 7))
    body = {"input": [short, exact, over], "task": "retrieval.query"}
    status, out = server.post(body)  # default: truncate true, cut at --max-length
    assert status == 200, out
    expected = model.encode([short, exact, over], task="retrieval.query", max_length=MAX_LENGTH)
    np.testing.assert_allclose(vectors(out), expected, atol=1e-5)
    assert out["usage"]["prompt_tokens"] == 10 + 2 * MAX_LENGTH
    assert server.post({**body, "truncate": True})[1] == out

    status, out = server.post({**body, "truncate": False})
    assert status == 400, out
    error = out["error"]
    assert error["param"] == "input[2]" and error["code"] == "input_too_long"
    assert f"{MAX_LENGTH + 7} tokens" in error["message"]
    assert f"limit of {MAX_LENGTH}" in error["message"]
    status, out = server.post({"input": [short, exact], "task": "retrieval.query",
                               "truncate": False})
    assert status == 200
    np.testing.assert_allclose(vectors(out), expected[:2], atol=1e-5)


def test_unknown_and_conflicting_fields(server):
    cases = [
        ({"input": "x", "embeding_type": "binary"}, "embeding_type"),
        ({"input": "x", "truncation": False}, "truncation"),
        ({"input": "x", "embedding_type": "bits"}, "embedding_type"),
        ({"input": "x", "embedding_type": "binary", "encoding_format": "base64"},
         "embedding_type"),
        ({"input": "x", "embedding_type": "binary", "encoding_format": "float"},
         "embedding_type"),
        ({"input": "x", "embedding_type": "int8", "normalized": False}, "embedding_type"),
        ({"input": "x", "truncate": "no"}, "truncate"),
        ({"input": [{"text": "x"}, {"image": "http://x/y.png"}]}, "input[1]"),
        ({"input": [{"txt": "x"}]}, "input[0]"),
        ({"input": [{}]}, "input[0]"),
        ({"input": [{"text": 3}]}, "input[0]"),
    ]
    for body, param in cases:
        status, out = server.post(body)
        assert status == 400, (body, out)
        assert out["error"]["param"] == param, (body, out)
        assert param.split("[")[0] in out["error"]["message"], (body, out)
    # Token ids: refused, with the LangChain setting that stops a client sending them.
    for ids in ([[5, 6, 7]], [5, 6, 7]):
        status, out = server.post({"input": ids})
        assert status == 400 and "check_embedding_ctx_length=False" in out["error"]["message"]


def test_tokenize_equals_the_tokenizer(server, model):
    texts = ["the quick brown fox", "rain on green hills, again!"]
    status, _, out = server.request("POST", "/tokenize", {"inputs": texts})
    assert status == 200, out
    assert len(out) == 2
    for text, tokens in zip(texts, out):
        enc = model.tokenizer.encode(text)
        assert [t["id"] for t in tokens] == enc.ids
        assert [t["special"] for t in tokens] == [bool(x) for x in enc.special_tokens_mask]
        for t, (start, stop) in zip(tokens, enc.offsets):
            if t["special"]:
                assert t["start"] is None and t["stop"] is None
            else:
                assert (t["start"], t["stop"]) == (start, stop)
                assert t["text"] == text[start:stop]
    # With a task: its instruction's tokens come first (null offsets), offsets stay in the text.
    # Untruncated: a text longer than --max-length gets all its tokens.
    long_text = texts_of_length(model, "retrieval.query", (MAX_LENGTH + 9,))[0]
    for field in ("task", "prompt_name"):
        status, _, out = server.request("POST", "/tokenize", {"inputs": long_text,
                                                              field: "retrieval.query"})
        assert status == 200, out
        enc = model.tokenizer.encode("Q: " + long_text)
        assert [t["id"] for t in out[0]] == enc.ids and len(enc.ids) == MAX_LENGTH + 9
        inside = [t for t in out[0] if t["start"] is not None]
        assert inside and all(long_text[t["start"]:t["stop"]].strip() for t in inside)
    status, _, out = server.request("POST", "/tokenize", {"inputs": [texts[0]],
                                                          "add_special_tokens": False})
    assert [t["id"] for t in out[0]] == model.tokenizer.encode(texts[0],
                                                               add_special_tokens=False).ids
    for body, param in (({"inputs": "x", "truncate": True}, "truncate"),
                        ({"input": "x"}, "input"),
                        ({"inputs": [[1, 2]]}, "inputs[0]"),
                        ({"inputs": "x", "task": "nonsense"}, "task"),
                        ({"inputs": "x", "task": "retrieval.query",
                          "prompt_name": "text-matching"}, "prompt_name")):
        status, _, out = server.request("POST", "/tokenize", body)
        assert status == 400 and out["error"]["param"] == param, (body, out)
