"""Property-based tests (hypothesis): encode over arbitrary text, the JSONL reader over escaped
surrogates, and the loader over corrupted files."""

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert.formats import load
from convert.safetensors_io import CheckpointError
from jina_jax import JinaEmbeddingsV3
from jina_jax.records import TextInput
from jina_jax.tree import flatten

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
ODD = st.sampled_from(["", " ", "\t\n", "\x00", "\x1b[0m", "\u200b", "\ud800", "\udfff",
                       "\ud83d\ude00", "é", "東京", "x" * 300, "  padded  "])
TEXT = st.one_of(st.text(max_size=40), ODD,
                 st.lists(ODD, min_size=1, max_size=4).map("".join))


@pytest.fixture(scope="module")
def model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


@SETTINGS
@given(texts=st.lists(TEXT, min_size=1, max_size=6),
       tasks=st.lists(st.sampled_from([None, "retrieval.query", "separation"]), min_size=6,
                      max_size=6))
def test_encode_any_text(model, texts, tasks):
    tasks = tasks[:len(texts)]
    texts, tasks = texts + texts[:1], tasks + tasks[:1]  # a duplicate too
    emb = model.encode(texts, task=tasks, max_length=24, batch_size=4)
    assert emb.shape == (len(texts), 48) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Order and batch invariance: each row is the text encoded alone.
    for i, (text, task) in enumerate(zip(texts, tasks)):
        alone = model.encode([text], task=task, max_length=24)[0]
        np.testing.assert_allclose(emb[i], alone, atol=1e-5)
    np.testing.assert_allclose(emb[-1], emb[0], atol=1e-6)


@SETTINGS
@given(texts=st.lists(TEXT, min_size=1, max_size=8))
def test_jsonl_with_escaped_surrogates_reads_and_encodes(model, tmp_path, texts):
    path = tmp_path / "in.jsonl"
    # ensure_ascii: every non-ASCII character, lone surrogates included, becomes a \u escape.
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="ascii")
    read = [t for t, _ in TextInput(str(path))]
    # What JSON itself decodes ("\ud83d\ude00" is one character; a lone "\ud800" stays).
    assert read == [json.loads(json.dumps(t)) for t in texts]
    emb = model.encode(iter(read), task="separation", max_length=24)  # any iterable
    assert emb.shape == (len(texts), 48) and np.isfinite(emb).all()


@pytest.fixture(scope="module")
def clean_params(transformers_dir):
    return {p: np.asarray(v) for p, v in flatten(load(transformers_dir).params).items()}


def _mutated(transformers_dir, tmp_path, name, mutate) -> str:
    folder = tmp_path / "ckpt"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(transformers_dir, folder)
    path = folder / name
    path.write_bytes(mutate(path.read_bytes()))
    return str(folder), str(path)


def _outcome(folder, path, clean_params):
    """Every outcome is a CheckpointError naming the file, or the very same model."""
    try:
        ckpt = load(folder)
    except CheckpointError as e:
        assert os.path.basename(path) in str(e), str(e)
        return
    got = {p: np.asarray(v) for p, v in flatten(ckpt.params).items()}
    assert got.keys() == clean_params.keys()
    for p in got:
        np.testing.assert_array_equal(got[p], clean_params[p])


@SETTINGS
@given(data=st.data())
def test_loader_fuzz_safetensors(transformers_dir, tmp_path, clean_params, data):
    original = open(os.path.join(transformers_dir, "model.safetensors"), "rb").read()
    header_end = 8 + int.from_bytes(original[:8], "little")
    kind = data.draw(st.sampled_from(["truncate", "flip_header", "flip_length"]))
    if kind == "truncate":
        cut = data.draw(st.integers(0, len(original) - 1))
        mutate = lambda b: b[:cut]  # noqa: E731
    elif kind == "flip_header":
        at = data.draw(st.integers(8, header_end - 1))
        bit = data.draw(st.integers(0, 7))
        mutate = lambda b: b[:at] + bytes([b[at] ^ (1 << bit)]) + b[at + 1:]  # noqa: E731
    else:
        at = data.draw(st.integers(0, 7))
        value = data.draw(st.integers(0, 255))
        mutate = lambda b: b[:at] + bytes([value]) + b[at + 1:]  # noqa: E731
    folder, path = _mutated(transformers_dir, tmp_path, "model.safetensors", mutate)
    _outcome(folder, path, clean_params)


@SETTINGS
@given(data=st.data())
def test_loader_fuzz_config(transformers_dir, tmp_path, clean_params, data):
    original = open(os.path.join(transformers_dir, "config.json"), "rb").read()
    structural = [i for i, c in enumerate(original) if chr(c) in '{}[]":,']
    kind = data.draw(st.sampled_from(["truncate", "flip_structure", "garbage"]))
    if kind == "truncate":
        cut = data.draw(st.integers(0, len(original) - 2))
        mutate = lambda b: b[:cut]  # noqa: E731
    elif kind == "flip_structure":
        at = data.draw(st.sampled_from(structural))
        new = data.draw(st.sampled_from(list(b'{}[]":,x0 ')))
        mutate = lambda b: b[:at] + bytes([new]) + b[at + 1:]  # noqa: E731
    else:
        junk = data.draw(st.binary(max_size=64))
        mutate = lambda b: junk  # noqa: E731
    folder, path = _mutated(transformers_dir, tmp_path, "config.json", mutate)
    _outcome(folder, path, clean_params)
