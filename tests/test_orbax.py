"""Train state through Orbax: resume gives the bit-identical next step; a folder of another
trainer, or an existing folder without overwrite, is refused."""

import numpy as np
import optax
import pytest

from jina_jax import JinaEmbeddingsV3, orbax_state
from jina_jax.training import Contrastive, Trainer
from tests.test_training import contrastive_arrays, flat_state as _flat


def test_orbax_resume_is_bit_identical(transformers_dir, hf_config, tmp_path):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    trainer = Trainer(model, Contrastive(symmetric=True), optax.adamw(1e-3), dropout=True)
    batch, *_ = contrastive_arrays(hf_config.vocab_size)
    state = trainer.init(seed=5)
    for _ in range(2):
        state, _ = trainer.step(state, batch)
    folder = str(tmp_path / "step-2")
    orbax_state.save(trainer, folder, state)
    straight, m1 = trainer.step(state, batch)

    again = Trainer(JinaEmbeddingsV3.from_pretrained(transformers_dir),
                    Contrastive(symmetric=True), optax.adamw(1e-3), dropout=True)
    restored = orbax_state.restore(again, folder)
    assert int(restored.step) == 2
    want = _flat(state)
    assert want.keys() == _flat(restored).keys()
    for key, value in want.items():
        np.testing.assert_array_equal(value, _flat(restored)[key], err_msg=key)
        assert value.dtype == _flat(restored)[key].dtype, key
    resumed, m2 = again.step(restored, batch)
    assert float(m1["loss"]) == float(m2["loss"])
    for key, value in _flat(straight).items():
        np.testing.assert_array_equal(value, _flat(resumed)[key], err_msg=key)

    # Never replaced unless asked; a temporary sibling never stays behind.
    with pytest.raises(FileExistsError, match="already exists"):
        orbax_state.save(trainer, folder, resumed)
    orbax_state.save(trainer, folder, resumed, overwrite=True)
    assert int(orbax_state.restore(again, folder).step) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]

    other = Trainer(model, Contrastive(), optax.adamw(1e-3), train=["text-matching"])
    with pytest.raises(ValueError, match="but this trainer trains"):
        orbax_state.restore(other, folder)
    with pytest.raises(FileNotFoundError, match="no jina-jax Orbax train state"):
        orbax_state.restore(trainer, str(tmp_path))
