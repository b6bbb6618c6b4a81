"""Parity with the live Transformers / PEFT reference, fp32, 1e-4 max-abs on unpadded positions."""

import subprocess
import sys

import numpy as np
import pytest

from jina_jax import JinaEmbeddingsV3
from tests import reference as ref

ATOL = 1e-4
TASKS = [None, *ref.TASKS]


def max_err(ours, theirs, mask):
    hidden = np.abs(np.asarray(ours.last_hidden_state) - theirs[0])[mask.astype(bool)].max()
    pooled = np.abs(np.asarray(ours.pooler_output) - theirs[1]).max()
    return hidden, pooled


@pytest.fixture(scope="module")
def batch(hf_config):
    return ref.padded_batch(hf_config.vocab_size)


@pytest.fixture(scope="module")
def b_model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


@pytest.fixture(scope="module")
def b_reference(transformers_dir, batch):
    """{task: (hidden, pooled)} from Transformers (+ PEFT for a task)."""
    out = {}
    for task in TASKS:
        folder = None if task is None else task.replace(".", "_").replace("-", "_")
        out[task] = ref.run(ref.peft_reference(transformers_dir, folder), *batch)
    return out


@pytest.mark.parametrize("task", TASKS)
def test_transformers_peft_parity(b_model, b_reference, batch, task):
    ours = b_model(batch[0], batch[1], task=task)
    hidden, pooled = max_err(ours, b_reference[task], batch[1])
    assert hidden < ATOL and pooled < ATOL, (hidden, pooled)


def test_adapters_change_the_output(b_reference, batch):
    """Guards the parity tests: every task's reference differs from the base model's."""
    mask = batch[1].astype(bool)
    for task in ref.TASKS:
        assert np.abs(b_reference[task][0] - b_reference[None][0])[mask].max() > 1e-2, task


def test_task_spellings_and_metadata(b_model):
    assert b_model.tasks == ref.TASKS  # release order, release spelling, from the folder names
    assert b_model.resolve_task("retrieval_query") == "retrieval.query"
    assert b_model.resolve_task("text_matching") == "text-matching"
    # Scales: alpha/r, alpha/sqrt(r) for rsLoRA.
    assert b_model.scales["retrieval.query"] == pytest.approx(5 / 3)
    assert b_model.scales["retrieval.passage"] == pytest.approx(3 / np.sqrt(2))


def test_left_padded_and_holey_masks(b_model, b_reference, transformers_dir, hf_config):
    ids, mask = ref.padded_batch(hf_config.vocab_size, left=True)
    mask[0, 3] = 0  # a hole in the middle of a row
    for task in (None, "separation"):
        folder = None if task is None else task
        theirs = ref.run(ref.peft_reference(transformers_dir, folder), ids, mask)
        hidden, pooled = max_err(b_model(ids, mask, task=task), theirs, mask)
        assert hidden < ATOL, hidden


def test_no_mask_equals_full_mask(b_model, batch):
    ids = batch[0][:1, :11]
    a = b_model(ids, None, task="classification").last_hidden_state
    b = b_model(ids, np.ones_like(ids), task="classification").last_hidden_state
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mixed_task_batch_equals_per_task(b_model, batch):
    ids, mask = batch
    rows = ["retrieval.query", None, "separation", "retrieval_passage"]
    mixed = b_model(ids, mask, task=rows)
    for i, task in enumerate(rows):
        single = b_model(ids, mask, task=task)
        m = mask[i].astype(bool)
        err = np.abs(np.asarray(mixed.last_hidden_state)[i] - np.asarray(single.last_hidden_state)[i])[m].max()
        perr = np.abs(np.asarray(mixed.pooler_output)[i] - np.asarray(single.pooler_output)[i]).max()
        assert err < ATOL and perr < ATOL, (task, err, perr)


def test_mixed_task_batch_matches_reference(b_model, b_reference, batch):
    ids, mask = batch
    rows = ["text-matching", "classification", "retrieval.query", None]
    mixed = b_model(ids, mask, task=rows)
    for i, task in enumerate(rows):
        m = mask[i].astype(bool)
        err = np.abs(np.asarray(mixed.last_hidden_state)[i] - b_reference[task][0][i])[m].max()
        assert err < ATOL, (task, err)


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
@pytest.mark.parametrize("task", TASKS)
def test_original_format_parity(request, hf_config, batch, storage, task):
    folder, stored = request.getfixturevalue(f"original_{storage}")
    ours = _cached_model(folder)(batch[0], batch[1], task=task)
    theirs = ref.run(ref.original_reference(stored, hf_config, task), *batch)
    hidden, pooled = max_err(ours, theirs, batch[1])
    assert hidden < ATOL and pooled < ATOL, (hidden, pooled)


def test_original_adapters_change_the_output(original_bf16, hf_config, batch):
    stored, mask = original_bf16[1], batch[1].astype(bool)
    base = ref.run(ref.original_reference(stored, hf_config, None), *batch)[0]
    for task in ref.TASKS:
        tuned = ref.run(ref.original_reference(stored, hf_config, task), *batch)[0]
        assert np.abs(tuned - base)[mask].max() > 1e-2, task


def test_original_format_metadata(original_fp32):
    model = _cached_model(original_fp32[0])
    assert model.tasks == ref.TASKS
    assert model.config.lora_rank == ref.A_RANK and model.config.rope_theta == 1234.5
    assert model.config.instruction("retrieval_query") == "Q: "
    assert all(s == pytest.approx(ref.A_ALPHA / ref.A_RANK) for s in model.scales.values())
    # LoRA on every Linear and Embedding, token-type table included.
    adapter = model.adapters["separation"]
    assert set(adapter["embeddings"]) == {"word", "token_type"}
    assert set(adapter["layers"]["attn"]) == {"qkv", "out"} and "pooler" in adapter


def test_original_without_pooler(ckpt_root, transformers_dir, hf_config, batch):
    folder = str(ckpt_root / "original-no-pooler")
    stored = ref.write_original(folder, transformers_dir, with_pooler=False)
    model = JinaEmbeddingsV3.from_pretrained(folder)
    assert not model.config.add_pooling_layer
    out = model(batch[0], batch[1], task="classification")
    assert out.pooler_output is None
    theirs = ref.run(ref.original_reference(stored, hf_config, "classification", False), *batch)
    err = np.abs(np.asarray(out.last_hidden_state) - theirs[0])[batch[1].astype(bool)].max()
    assert err < ATOL, err


@pytest.mark.parametrize("source", ["original_bf16", "transformers_dir"])
def test_convert_round_trip_is_exact(request, tmp_path, batch, source):
    """`python -m convert SRC DST` then loading DST gives exactly what loading SRC gives."""
    src = request.getfixturevalue(source)
    src = src[0] if isinstance(src, tuple) else src
    dst = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "convert", src, str(dst)], check=True,
                   capture_output=True, text=True)
    direct, converted = _cached_model(src), JinaEmbeddingsV3.from_pretrained(dst)
    assert converted.config == direct.config and converted.scales == direct.scales
    for task in (None, "retrieval.query", "text-matching"):
        a = direct(batch[0], batch[1], task=task)
        b = converted(batch[0], batch[1], task=task)
        np.testing.assert_array_equal(np.asarray(a.last_hidden_state), np.asarray(b.last_hidden_state))
        np.testing.assert_array_equal(np.asarray(a.pooler_output), np.asarray(b.pooler_output))


def test_convert_bf16_storage(tmp_path, original_fp32, hf_config, batch):
    dst = tmp_path / "bf16"
    subprocess.run([sys.executable, "-m", "convert", original_fp32[0], str(dst), "--dtype",
                    "bfloat16"], check=True, capture_output=True, text=True)
    model = JinaEmbeddingsV3.from_pretrained(dst)
    ours = model(batch[0], batch[1], task="separation").last_hidden_state
    full = _cached_model(original_fp32[0])(batch[0], batch[1], task="separation").last_hidden_state
    assert _min_token_cosine(ours, full, batch[1]) > 0.999


def test_bf16_compute_close_to_fp32(b_model, transformers_dir, batch):
    bf16 = JinaEmbeddingsV3.from_pretrained(transformers_dir, dtype="bfloat16")
    mixed = JinaEmbeddingsV3.from_pretrained(transformers_dir, dtype="bfloat16",
                                             param_dtype="float32")
    for task in (None, "retrieval.query"):
        full = b_model(batch[0], batch[1], task=task).last_hidden_state
        for model in (bf16, mixed):
            half = model(batch[0], batch[1], task=task).last_hidden_state
            assert half.dtype == np.dtype("bfloat16")
            assert _min_token_cosine(half, full, batch[1]) > 0.999


def _min_token_cosine(a, b, mask):
    a = np.asarray(a, np.float32)[mask.astype(bool)]
    b = np.asarray(b, np.float32)[mask.astype(bool)]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return cos.min()


_MODELS = {}


def _cached_model(folder):
    if folder not in _MODELS:
        _MODELS[folder] = JinaEmbeddingsV3.from_pretrained(folder)
    return _MODELS[folder]
