"""The four heads against Transformers' head models (+ PEFT), logits and losses."""

import shutil
import warnings

import numpy as np
import pytest
import torch
from transformers import (
    JinaEmbeddingsV3ForMaskedLM as HFMaskedLM,
    JinaEmbeddingsV3ForQuestionAnswering as HFQuestionAnswering,
    JinaEmbeddingsV3ForSequenceClassification as HFSequenceClassification,
    JinaEmbeddingsV3ForTokenClassification as HFTokenClassification,
)

from convert import CheckpointError
from jina_jax import (
    JinaEmbeddingsV3ForMaskedLM,
    JinaEmbeddingsV3ForQuestionAnswering,
    JinaEmbeddingsV3ForSequenceClassification,
    JinaEmbeddingsV3ForTokenClassification,
    losses,
)
from tests import reference as ref

ATOL = 1e-4
HEAD_ADAPTER = {"classification": dict(r=3, lora_alpha=6, target_modules=[
    "q_proj", "v_proj", "o_proj", "fc1", "word_embeddings"])}
CASES = {
    "mlm": (HFMaskedLM, JinaEmbeddingsV3ForMaskedLM, None),
    "seq": (HFSequenceClassification, JinaEmbeddingsV3ForSequenceClassification, 3),
    "tok": (HFTokenClassification, JinaEmbeddingsV3ForTokenClassification, 5),
    "qa": (HFQuestionAnswering, JinaEmbeddingsV3ForQuestionAnswering, 2),
}


@pytest.fixture(scope="module")
def batch():
    return ref.padded_batch(ref.SMALL["vocab_size"], lengths=(9, 4, 6), seed=8)


@pytest.fixture(scope="module")
def head_dirs(ckpt_root):
    """{case: folder}: a Transformers head model (random weights) + one PEFT adapter."""
    out = {}
    for i, (case, (hf_cls, _, num_labels)) in enumerate(CASES.items()):
        kw = {} if num_labels is None else {"num_labels": num_labels}
        model = ref.random_base(ref.make_config(**kw), seed=20 + i, cls=hf_cls)
        folder = str(ckpt_root / f"head-{case}")
        ref.write_transformers(folder, model, adapters=HEAD_ADAPTER, seed=30 + i)
        out[case] = folder
    return out


def _load(cls, folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a saved head loads without "newly initialised" noise
        return cls.from_pretrained(folder, **kw)


def _reference(case, folder, task, merged=False):
    hf_cls = CASES[case][0]
    model = ref.peft_reference(folder, task, cls=hf_cls)
    return model.merge_and_unload() if merged else model


def _torch(x):
    return torch.from_numpy(np.asarray(x)).long()


@pytest.mark.parametrize("task", [None, "classification"])
def test_sequence_classification(head_dirs, batch, task):
    ids, mask = batch
    labels = np.array([2, 0, 1])
    ours = _load(JinaEmbeddingsV3ForSequenceClassification, head_dirs["seq"])(
        ids, mask, task=task, labels=labels)
    with torch.no_grad():
        theirs = _reference("seq", head_dirs["seq"], task)(
            input_ids=_torch(ids), attention_mask=_torch(mask), labels=_torch(labels))
    assert np.asarray(ours.logits).shape == (3, 3)
    assert np.abs(np.asarray(ours.logits) - theirs.logits.numpy()).max() < ATOL
    assert abs(float(ours.loss) - float(theirs.loss)) < 1e-5


@pytest.mark.parametrize("task", [None, "classification"])
def test_token_classification(head_dirs, batch, task):
    ids, mask = batch
    labels = np.where(mask.astype(bool), np.arange(ids.size).reshape(ids.shape) % 5, -100)
    ours = _load(JinaEmbeddingsV3ForTokenClassification, head_dirs["tok"])(
        ids, mask, task=task, labels=labels)
    with torch.no_grad():
        theirs = _reference("tok", head_dirs["tok"], task)(
            input_ids=_torch(ids), attention_mask=_torch(mask), labels=_torch(labels))
    m = mask.astype(bool)
    assert np.abs(np.asarray(ours.logits) - theirs.logits.numpy())[m].max() < ATOL
    assert abs(float(ours.loss) - float(theirs.loss)) < 1e-5


@pytest.mark.parametrize("task", [None, "classification"])
def test_question_answering(head_dirs, batch, task):
    ids, mask = batch
    start, end = np.array([1, 0, 40]), np.array([3, 2, 5])  # 40 is past the end: ignored
    ours = _load(JinaEmbeddingsV3ForQuestionAnswering, head_dirs["qa"])(
        ids, mask, task=task, start_positions=start, end_positions=end)
    with torch.no_grad():
        theirs = _reference("qa", head_dirs["qa"], task)(
            input_ids=_torch(ids), attention_mask=_torch(mask), start_positions=_torch(start),
            end_positions=_torch(end))
    m = mask.astype(bool)
    assert np.abs(np.asarray(ours.start_logits) - theirs.start_logits.numpy())[m].max() < ATOL
    assert np.abs(np.asarray(ours.end_logits) - theirs.end_logits.numpy())[m].max() < ATOL
    assert abs(float(ours.loss) - float(theirs.loss)) < 1e-5


@pytest.mark.parametrize("task,adapt_decoder", [(None, False), ("classification", False),
                                                ("classification", True)])
def test_masked_lm(head_dirs, batch, task, adapt_decoder):
    """adapt_decoder=False is PeftModel's forward (the adapter wraps only the lookup);
    True is the adapter merged into the tied table (`merge_and_unload`)."""
    ids, mask = batch
    labels = np.full(ids.shape, -100)
    labels[0, 2], labels[1, 1], labels[2, 4] = 17, 5, 99
    ours = _load(JinaEmbeddingsV3ForMaskedLM, head_dirs["mlm"], adapt_decoder=adapt_decoder)(
        ids, mask, task=task, labels=labels)
    with torch.no_grad():
        theirs = _reference("mlm", head_dirs["mlm"], task, merged=adapt_decoder)(
            input_ids=_torch(ids), attention_mask=_torch(mask), labels=_torch(labels))
    m = mask.astype(bool)
    assert np.abs(np.asarray(ours.logits) - theirs.logits.numpy())[m].max() < ATOL
    assert abs(float(ours.loss) - float(theirs.loss)) < 1e-5


def test_masked_lm_adapted_decoder_differs(head_dirs, batch):
    """Guards the test above: the two decoder choices really give different logits."""
    a = _load(JinaEmbeddingsV3ForMaskedLM, head_dirs["mlm"])(*batch, task="classification")
    b = _load(JinaEmbeddingsV3ForMaskedLM, head_dirs["mlm"], adapt_decoder=True)(
        *batch, task="classification")
    assert np.abs(np.asarray(a.logits) - np.asarray(b.logits)).max() > 1e-2


@pytest.mark.parametrize("case", ["seq", "mlm"])
def test_mixed_tasks_under_a_head(head_dirs, batch, case):
    cls = CASES[case][1]
    kw = {"adapt_decoder": True} if case == "mlm" else {}
    model = _load(cls, head_dirs[case], **kw)
    ids, mask = batch
    rows = ["classification", None, "classification"]
    mixed = np.asarray(model(ids, mask, task=rows).logits)
    for i, task in enumerate(rows):
        single = np.asarray(model(ids, mask, task=task).logits)
        diff = np.abs(mixed[i] - single[i])
        assert (diff[mask[i].astype(bool)] if case == "mlm" else diff).max() < ATOL


def test_missing_head_is_initialised_and_reported(transformers_dir, batch):
    with pytest.warns(UserWarning, match=r"no sequence_classification head; newly initialised \(seed 4\).*out_proj/kernel"):
        a = JinaEmbeddingsV3ForSequenceClassification.from_pretrained(transformers_dir,
                                                                      num_labels=4, seed=4)
    assert "dense/kernel" in a.newly_initialized
    with pytest.warns(UserWarning):
        b = JinaEmbeddingsV3ForSequenceClassification.from_pretrained(transformers_dir,
                                                                      num_labels=4, seed=4)
    np.testing.assert_array_equal(np.asarray(a(*batch).logits), np.asarray(b(*batch).logits))
    kernel = np.asarray(a.head_params["out_proj"]["kernel"])
    assert kernel.shape == (48, 4) and 0.01 < kernel.std() < 0.03  # N(0, 0.02), the reference's
    assert not np.asarray(a.head_params["out_proj"]["bias"]).any()


def test_head_of_another_kind_is_reported_unused(head_dirs):
    with pytest.warns(UserWarning, match=r"head weights not used by .*TokenClassification.*classifier\.dense\.weight"), \
            pytest.warns(UserWarning, match="no token_classification head; newly initialised"):
        JinaEmbeddingsV3ForTokenClassification.from_pretrained(head_dirs["seq"], num_labels=3)


def test_num_labels_mismatch_is_an_error(head_dirs):
    with pytest.raises(ValueError, match="num_labels=4, but the checkpoint's sequence_classification head has 3"):
        JinaEmbeddingsV3ForSequenceClassification.from_pretrained(head_dirs["seq"], num_labels=4)


def test_incomplete_head_is_an_error(head_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "seq"
    shutil.copytree(head_dirs["seq"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["classifier.out_proj.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"head is incomplete: missing \['classifier\.out_proj\.bias'\]"):
        JinaEmbeddingsV3ForSequenceClassification.from_pretrained(folder)


def test_head_survives_convert(head_dirs, batch, tmp_path):
    import subprocess
    import sys

    dst = tmp_path / "qa"
    subprocess.run([sys.executable, "-m", "convert", head_dirs["qa"], str(dst)], check=True,
                   capture_output=True)
    a = _load(JinaEmbeddingsV3ForQuestionAnswering, head_dirs["qa"])(*batch, task="classification")
    b = _load(JinaEmbeddingsV3ForQuestionAnswering, dst)(*batch, task="classification")
    np.testing.assert_array_equal(np.asarray(a.start_logits), np.asarray(b.start_logits))


@pytest.mark.parametrize("problem", ["regression1", "regression", "multi"])
def test_sequence_losses_match_torch(problem):
    rng = np.random.default_rng(0)
    n = 1 if problem == "regression1" else 4
    logits = rng.standard_normal((6, n)).astype(np.float32)
    if problem == "multi":
        labels = (rng.random((6, n)) > 0.5).astype(np.float32)
        want = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(labels))
    else:
        labels = rng.standard_normal((6, n)).astype(np.float32)
        want = torch.nn.functional.mse_loss(torch.tensor(logits).squeeze(), torch.tensor(labels).squeeze())
    # Float labels with several outputs are inferred as multi-label, as the reference does;
    # multi-output regression has to be asked for.
    kind = "regression" if problem == "regression" else None
    got = losses.sequence_classification_loss(logits, labels, kind)
    assert abs(float(got) - float(want)) < 1e-6


@pytest.mark.parametrize("case", ["seq", "tok", "qa", "mlm"])
def test_trained_head_exports_to_transformers(head_dirs, batch, tmp_path, case):
    """Head and task adapter trained with the head's own loss, then served by Transformers'
    head model + PEFT from `save_pretrained(format="transformers")`."""
    import optax

    from jina_jax.training import HeadLoss, Trainer

    hf_cls, cls, num_labels = CASES[case]
    model = _load(cls, head_dirs[case])
    ids, mask = batch
    lengths = mask.sum(1).astype(np.int32)
    rows = {"ids": ids.astype(np.int32), "lengths": lengths}
    rng = np.random.default_rng(0)
    if case == "qa":
        rows |= {"start_positions": np.array([1, 2, 0]), "end_positions": np.array([3, 2, 4])}
    elif case == "seq":
        rows["labels"] = np.array([0, 2, 1])
    else:
        labels = rng.integers(0, num_labels or ref.SMALL["vocab_size"], ids.shape)
        rows["labels"] = np.where(mask.astype(bool), labels, -100)
    trainer = Trainer(model, HeadLoss(task="classification"), optax.adam(3e-3),
                      train=["head", "classification"], dropout=False)
    state = trainer.init()
    history = []
    for _ in range(5):
        state, metrics = trainer.step(state, rows)
        history.append(float(metrics["loss"]))
    assert history[-1] < history[0], history
    trainer.update_model(state)

    dst = str(tmp_path / "hf")
    model.save_pretrained(dst, format="transformers")
    m = mask.astype(bool)
    for task in (None, "classification"):
        ours = model(ids, mask, task=task)
        ours = [np.asarray(x) for x in (ours.start_logits, ours.end_logits)] if case == "qa" \
            else [np.asarray(ours.logits)]
        folder = None if task is None else "classification"
        with torch.no_grad():
            out = ref.peft_reference(dst, folder, cls=hf_cls)(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        theirs = [out.start_logits.numpy(), out.end_logits.numpy()] if case == "qa" \
            else [out.logits.numpy()]
        for x, y in zip(ours, theirs):
            if x.ndim >= 2 and x.shape[:2] == m.shape:
                x, y = x[m], y[m]
            assert np.abs(x - y).max() < ATOL, (case, task, np.abs(x - y).max())
