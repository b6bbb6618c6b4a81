"""Full-size checks (released widths, 24 layers): slow, several GB of memory. `pytest -m slow`."""

import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from convert.random_checkpoint import write_random_release
from jina_jax import JinaEmbeddingsV3
from tests import reference as ref

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_release(tmp_path_factory):
    return write_random_release(str(tmp_path_factory.mktemp("full") / "release"))


def test_full_size_release_parity_and_convert(full_release, tmp_path):
    model = JinaEmbeddingsV3.from_pretrained(full_release)
    assert model.config.num_hidden_layers == 24 and model.config.vocab_size == 250002
    ids, mask = ref.padded_batch(model.config.vocab_size, lengths=(37, 12), seed=5)
    ours = {task: model(ids, mask, task=task) for task in (None, "retrieval.passage")}

    # The reference: the release's tensors, merged by the release's formula, in Transformers.
    stored = {k: v.float() for k, v in load_file(f"{full_release}/model.safetensors").items()}
    hf_cfg = ref.make_config(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                             num_attention_heads=16, intermediate_size=4096,
                             max_position_embeddings=8194, layer_norm_eps=1e-5,
                             rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    scale = model.config.lora_alpha / model.config.lora_rank
    for task, out in ours.items():
        reference = ref.original_reference(stored, hf_cfg, task, tasks=model.tasks, scale=scale)
        theirs = ref.run(reference, ids, mask)
        del reference
        err = np.abs(np.asarray(out.last_hidden_state) - theirs[0])[mask.astype(bool)].max()
        perr = np.abs(np.asarray(out.pooler_output) - theirs[1]).max()
        assert err < 1e-4 and perr < 1e-4, (task, err, perr)
    del stored

    dst = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "convert", full_release, str(dst)], check=True,
                   capture_output=True)
    converted = JinaEmbeddingsV3.from_pretrained(dst)
    again = converted(ids, mask, task="retrieval.passage")
    np.testing.assert_array_equal(np.asarray(again.last_hidden_state),
                                  np.asarray(ours["retrieval.passage"].last_hidden_state))
