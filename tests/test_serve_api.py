"""`jina-jax serve` as the Jina Embeddings API and TEI's /tokenize: live servers on 127.0.0.1
(tests/test_serve.py's `Server`), every field and encoding checked against `encode()` with the
same options (packed types bit for bit), against `model.tokenizer`, and every unknown or
conflicting field refused with a 400 naming it."""

import base64
import concurrent.futures
import json
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from jina_jax import JinaEmbeddingsV3
from jina_jax.adapters import AdapterSet, read_adapter
from jina_jax.api import int8_ranges
from jina_jax.batcher import Batcher

from .test_cli import _cli
from .test_serve import TASKS, Server, sample_text, vectors
from .test_training import synthetic_pairs

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


def tokenizer_of(model):
    """The model's tokenizer, untruncated (`encode` leaves its own set to truncate)."""
    tok = Tokenizer.from_str(model.tokenizer.to_str())
    tok.no_truncation()
    return tok


def texts_of_length(model, task, lengths):
    """Texts whose token counts (instruction and <s>/</s> included) are `lengths` exactly."""
    instruction = model.config.instruction(task) if task else ""
    tokenizer, out = tokenizer_of(model), []
    for want in lengths:
        words = []
        while True:
            text = " ".join(words)
            count = len(tokenizer.encode(instruction + text).ids) if words else 0
            if count >= want:
                break
            words.append("ab")
        # "ab" is one or two tokens: trim characters until the count is exact.
        while len(tokenizer.encode(instruction + text).ids) > want:
            text = text[:-1]
        assert len(tokenizer.encode(instruction + text).ids) == want, (want, text)
        out.append(text)
    return out


def test_jina_fields_equal_encode(server, model):
    texts = [sample_text(i) for i in range(5)]
    kwargs = dict(task="retrieval.passage", max_length=MAX_LENGTH)
    # Jina's {"text": ...} objects, mixed with plain strings; dimensions and normalized.
    status, _, out = server.request("POST", "/embeddings", {
        "model": "jina-embeddings-v3", "task": "retrieval.passage",
        "input": [{"text": t} if i % 2 else t for i, t in enumerate(texts)],
        "dimensions": 32, "normalized": False, "embedding_type": "float"})
    assert status == 200, out
    np.testing.assert_allclose(vectors(out), model.encode(texts, truncate_dim=32,
                                                          normalize=False, **kwargs), atol=1e-5)
    tokens = sum(min(len(tokenizer_of(model).encode("P: " + t).ids), MAX_LENGTH) for t in texts)
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
    status, again = server.post({**body, "truncate": True})
    assert status == 200 and again["usage"] == out["usage"]
    np.testing.assert_allclose(vectors(again), expected, atol=1e-5)

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
    tokenizer = tokenizer_of(model)
    texts = ["the quick brown fox", "rain on green hills, again!"]
    status, _, out = server.request("POST", "/tokenize", {"inputs": texts})
    assert status == 200, out
    assert len(out) == 2
    for text, tokens in zip(texts, out):
        enc = tokenizer.encode(text)
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
        enc = tokenizer.encode("Q: " + long_text)
        assert [t["id"] for t in out[0]] == enc.ids and len(enc.ids) == MAX_LENGTH + 9
        inside = [t for t in out[0] if t["start"] is not None]
        assert inside and all(long_text[t["start"]:t["stop"]].strip() for t in inside)
    status, _, out = server.request("POST", "/tokenize", {"inputs": [texts[0]],
                                                          "add_special_tokens": False})
    assert [t["id"] for t in out[0]] == tokenizer.encode(texts[0],
                                                               add_special_tokens=False).ids
    for body, param in (({"inputs": "x", "truncate": True}, "truncate"),
                        ({"input": "x"}, "input"),
                        ({"inputs": [[1, 2]]}, "inputs[0]"),
                        ({"inputs": "x", "task": "nonsense"}, "task"),
                        ({"inputs": "x", "task": "retrieval.query",
                          "prompt_name": "text-matching"}, "prompt_name")):
        status, _, out = server.request("POST", "/tokenize", body)
        assert status == 400 and out["error"]["param"] == param, (body, out)


# --- the user's adapters ------------------------------------------------------------------

def finetune_adapters(base, pairs, runs):
    """`jina-jax finetune --adapter NAME --rank R --adapter-only` for each (out, name, rank,
    seed) of `runs`, side by side: new adapters, trained with a large step so that they move
    the embeddings well past the test tolerance."""
    exe = shutil.which("jina-jax")
    procs = [subprocess.Popen(
        [exe, "finetune", "--model", base, "--data", pairs, "--output", str(out), "--adapter",
         name, "--rank", str(rank), "--steps", "2", "--batch-size", "4", "--lr", "3e-2",
         "--max-length", "16", "--seed", str(seed), "--adapter-only"],
        stderr=subprocess.PIPE, text=True) for out, name, rank, seed in runs]
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-3000:]
    return [str(out) for out, *_ in runs]


@pytest.fixture(scope="module")
def tuned(transformers_dir, tmp_path_factory):
    """Two adapter folders from `jina-jax finetune --adapter-only`."""
    root = tmp_path_factory.mktemp("tuned")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n"
                             for q, p in synthetic_pairs(8)))
    return finetune_adapters(transformers_dir, str(pairs), [(root / "legal", "legal", 2, 0),
                                                            (root / "medical", "medical", 3, 1)])


def test_finetune_adapter_only_is_small_and_peft(tuned, transformers_dir):
    legal, _ = tuned
    sub = os.path.join(legal, "legal")
    assert sorted(os.listdir(legal)) == ["legal"]
    assert sorted(os.listdir(sub)) == ["adapter_config.json", "adapter_model.safetensors",
                                       "jina_jax_task.json"]
    base_size = sum(os.path.getsize(os.path.join(transformers_dir, f))
                    for f in os.listdir(transformers_dir) if f.endswith(".safetensors"))
    assert os.path.getsize(os.path.join(sub, "adapter_model.safetensors")) < base_size / 4
    conf = json.load(open(os.path.join(sub, "adapter_config.json")))
    assert conf["peft_type"] == "LORA" and conf["r"] == 2
    # PEFT loads it onto Transformers' model and computes what a model carrying it computes.
    ref = pytest.importorskip("tests.reference")
    peft = pytest.importorskip("peft")
    peft_model = peft.PeftModel.from_pretrained(ref.peft_reference(transformers_dir, None),
                                                sub).eval()
    ours = JinaEmbeddingsV3.from_pretrained(transformers_dir, adapters={"legal": legal})
    ids, mask = ref.padded_batch(ours.config.vocab_size)
    expected, _ = ref.run(peft_model, ids, mask)
    got = np.asarray(ours(ids, mask, task="legal").last_hidden_state)
    assert np.abs(got - np.asarray(ours(ids, mask).last_hidden_state)).max() > 1e-3
    np.testing.assert_allclose(got * mask[..., None], expected * mask[..., None], atol=1e-4)


def test_adapters_at_start_and_hot_loaded(transformers_dir, tuned, tmp_path):
    """A server started with one fine-tuned adapter, then another loaded into a slot while 4
    clients keep sending other tasks: each equals encode() of a model carrying it, no client
    sees an error, nothing compiles; bad folders are 4xx naming the file and key."""
    legal, medical = tuned
    srv = Server(transformers_dir, "--adapter", f"legal={legal}", "--adapter-slots", "1",
                 "--max-adapter-rank", "16", "--max-length", str(MAX_LENGTH),
                 "--max-batch-size", "8", "--api-key", "k")
    auth = {"Authorization": "Bearer k"}
    try:
        texts = [sample_text(i) for i in range(4)]
        carrying = JinaEmbeddingsV3.from_pretrained(
            transformers_dir, adapters={"legal": legal, "medical": medical})
        plain = carrying.encode(texts, max_length=MAX_LENGTH)
        ids = [m["id"] for m in srv.request("GET", "/v1/models", headers=auth)[2]["data"]]
        assert "jina-embeddings-v3:legal" in ids and "jina-embeddings-v3:medical" not in ids

        def embed(task, via_model=False):
            body = {"input": texts, **({"model": f"jina-embeddings-v3:{task}"} if via_model
                                       else {"task": task})}
            return srv.post(body, headers=auth)

        status, out = embed("legal", via_model=True)
        assert status == 200, out
        expected = carrying.encode(texts, task="legal", max_length=MAX_LENGTH)
        np.testing.assert_allclose(vectors(out), expected, atol=1e-5)
        assert np.abs(expected - plain).max() > 1e-3  # the adapter does something
        assert embed("medical")[0] == 400  # not loaded yet

        # A concurrent load of the release's tasks while adapters come and go.
        stop, errors, answered = threading.Event(), [], []

        def client(k):
            while not stop.is_set():
                task = TASKS[k % len(TASKS)]
                status, out = srv.post({"input": sample_text(k), "task": task}, headers=auth)
                (answered if status == 200 else errors).append((task, status, out))

        compiles = srv.metrics()["jina_jax_compiles"]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            load = [pool.submit(client, k) for k in range(4)]
            status, _, out = srv.request("POST", "/v1/adapters",
                                         {"name": "medical", "path": medical}, headers=auth)
            assert status == 200, out
            assert "medical" in out["tasks"] and out["free_slots"] == 0
            status, out = embed("medical")
            assert status == 200, out
            expected = carrying.encode(texts, task="medical", max_length=MAX_LENGTH)
            np.testing.assert_allclose(vectors(out), expected, atol=1e-5)
            assert np.abs(expected - plain).max() > 1e-3

            # Bad folders: a 4xx naming the file and the key; the server goes on.
            broken = tmp_path / "broken"
            shutil.copytree(os.path.join(medical, "medical"), broken)
            conf = json.loads((broken / "adapter_config.json").read_text())
            (broken / "adapter_config.json").write_text(json.dumps({**conf, "r": "four"}))
            cases = [({"name": "b", "path": str(broken)}, 400, "adapter_config.json"),
                     ({"name": "b", "path": str(tmp_path / "nowhere")}, 400, "nowhere"),
                     ({"name": "b", "path": legal}, 409, "slot"),
                     ({"name": "legal", "path": medical}, 409, "started with"),
                     ({"name": "b", "path": medical, "rank": 2}, 400, "rank"),
                     ({"name": "b"}, 400, "path")]
            for body, code, word in cases:
                status, _, out = srv.request("POST", "/v1/adapters", body, headers=auth)
                assert status == code and word in out["error"]["message"], (body, out)
            assert srv.request("POST", "/v1/adapters", {"name": "b", "path": medical})[0] == 401
            assert srv.request("DELETE", "/v1/adapters/legal", headers=auth)[0] == 409
            assert srv.request("DELETE", "/v1/adapters/nothing", headers=auth)[0] == 404
            status, _, out = srv.request("DELETE", "/v1/adapters/medical", headers=auth)
            assert status == 200 and "medical" not in out["tasks"], out
            assert embed("medical")[0] == 400
            # The freed slot takes another adapter (the same folder again).
            status, _, out = srv.request("POST", "/v1/adapters",
                                         {"name": "medical", "path": medical}, headers=auth)
            assert status == 200, out
            time.sleep(1)  # let the clients run on the new set too
            stop.set()
            for f in load:
                f.result(60)
        assert not errors, errors[:3]
        assert len(answered) >= 8
        for task, _, out in answered[:8]:
            assert out["data"][0]["embedding"]
        assert srv.metrics()["jina_jax_compiles"] == compiles
        assert embed("medical")[0] == 200
    finally:
        srv.stop()


def test_a_request_keeps_the_adapter_set_it_came_with(transformers_dir, tuned):
    """In process: a job submitted before its adapter's slot is given to another adapter of
    the same name is answered with the old one, the next job with the new one, in shapes
    compiled once for every set."""
    legal, medical = tuned
    base = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    first = AdapterSet.build(base, slots=1, rank=16).with_adapter(
        read_adapter("x", legal, base.config))
    batcher = Batcher(base, max_batch_tokens=256, max_batch_size=8, max_wait_ms=5,
                      max_length=MAX_LENGTH, adapters=first)
    batcher.warm_up()
    compiled = base.compile_count
    texts = [sample_text(i) for i in range(3)]
    old = batcher.submit(texts, ["x"] * 3, 48)
    batcher.adapters = first.without("x").with_adapter(read_adapter("x", medical, base.config))
    new = batcher.submit(texts, ["x"] * 3, 48)
    batcher.start()
    try:
        for job, folder in ((old, legal), (new, medical)):
            carrying = JinaEmbeddingsV3.from_pretrained(transformers_dir,
                                                        adapters={"x": folder})
            np.testing.assert_allclose(job.future.result(60)[0],
                                       carrying.encode(texts, task="x", max_length=MAX_LENGTH),
                                       atol=1e-5)
    finally:
        batcher.close(30)
    assert base.compile_count == compiled


def test_adapter_flags_refused_before_loading(transformers_dir, tmp_path):
    for flag, word in (("legal", "NAME=PATH"), (f"legal={tmp_path / 'none'}", "no such folder")):
        run = _cli("serve", "--model", transformers_dir, "--port", "0", "--adapter", flag)
        assert run.returncode == 2 and word in run.stderr, run.stderr
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"query": "a", "positive": "b"}\n')
    run = _cli("finetune", "--model", transformers_dir, "--data", str(data), "--output",
               str(tmp_path / "out"), "--adapter-only", "--format", "transformers")
    assert run.returncode == 2 and "--format" in run.stderr, run.stderr
    # A folder that is no adapter: the server stops by itself, naming it, exit 1.
    (tmp_path / "empty").mkdir()
    run = _cli("serve", "--model", transformers_dir, "--port", "0", "--adapter",
               f"x={tmp_path / 'empty'}")
    assert run.returncode == 1 and "empty" in run.stderr and "Traceback" not in run.stderr
