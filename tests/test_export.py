"""save_pretrained: back to Transformers + PEFT (served by the PyTorch stack) and to our format."""

import numpy as np
import pytest

from jina_jax import JinaEmbeddingsV3
from tests import reference as ref

TASKS = [None, "retrieval.query", "separation", "text-matching"]


@pytest.mark.parametrize("source", ["original_fp32", "transformers_dir"])
def test_transformers_export_loads_in_peft(request, tmp_path, hf_config, source):
    src = request.getfixturevalue(source)
    src = src[0] if isinstance(src, tuple) else src
    model = JinaEmbeddingsV3.from_pretrained(src)
    dst = str(tmp_path / "hf")
    model.save_pretrained(dst, format="transformers")
    ids, mask = ref.padded_batch(hf_config.vocab_size)
    again = JinaEmbeddingsV3.from_pretrained(dst)
    assert again.tasks == model.tasks
    for task in TASKS:
        ours = model(ids, mask, task=task)
        folder = None if task is None else task.replace(".", "_").replace("-", "_")
        theirs = ref.run(ref.peft_reference(dst, folder), ids, mask)
        m = mask.astype(bool)
        err = np.abs(np.asarray(ours.last_hidden_state) - theirs[0])[m].max()
        perr = np.abs(np.asarray(ours.pooler_output) - theirs[1]).max()
        assert err < 1e-4 and perr < 1e-4, (task, err, perr)
        back = again(ids, mask, task=task).last_hidden_state
        assert np.abs(np.asarray(back) - np.asarray(ours.last_hidden_state))[m].max() < 1e-4


def test_own_format_round_trip_is_exact(tmp_path, original_bf16, hf_config):
    model = JinaEmbeddingsV3.from_pretrained(original_bf16[0])
    model.save_pretrained(str(tmp_path / "ours"))
    again = JinaEmbeddingsV3.from_pretrained(tmp_path / "ours")
    ids, mask = ref.padded_batch(hf_config.vocab_size)
    for task in TASKS:
        np.testing.assert_array_equal(np.asarray(model(ids, mask, task=task).last_hidden_state),
                                      np.asarray(again(ids, mask, task=task).last_hidden_state))


def test_unknown_export_format(tmp_path, transformers_dir):
    with pytest.raises(ValueError, match="format 'onnx' is not supported"):
        JinaEmbeddingsV3.from_pretrained(transformers_dir).save_pretrained(tmp_path, format="onnx")
