"""The attention implementations agree, and the chooser picks the documented one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jina_jax import JinaEncoder
from jina_jax.attention import blockwise_attention, choose_implementation, dot_product_attention
from tests import reference as ref


def _qkv(b=3, l=300, n=3, d=16, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (b, l, n, d), jnp.float32) * 2 for k in keys]


@pytest.mark.parametrize("block", [64, 128, 512])
def test_blockwise_equals_plain(block):
    q, k, v = _qkv()
    mask = np.ones((3, 300), bool)
    mask[0, 250:] = False          # right padding, not a multiple of the block
    mask[1, :40] = False           # left padding
    mask[2, 100:170] = False       # a hole
    plain = dot_product_attention(q, k, v, mask=jnp.asarray(mask), implementation="xla")
    blocked = blockwise_attention(q, k, v, jnp.asarray(mask), block=block)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(plain), atol=1e-5)


def test_blockwise_bf16_close():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(l=200))
    plain = dot_product_attention(q, k, v, implementation="xla").astype(jnp.float32)
    blocked = blockwise_attention(q, k, v, block=64).astype(jnp.float32)
    assert blocked.dtype == jnp.float32
    # bf16 holds ~3 significant digits: allow a couple of ulps at values of magnitude ~4.
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(plain), rtol=2e-2, atol=2e-2)


def test_model_parity_through_blockwise(transformers_dir, hf_config):
    """The whole encoder on the blockwise path still matches the Transformers reference."""
    from jina_jax import JinaEmbeddingsV3

    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    ids, mask = ref.padded_batch(hf_config.vocab_size, left=True)
    params, lora = model.params_for("retrieval.query")
    module = JinaEncoder(model.config, implementation="blockwise")
    ours = module.apply({"params": params}, ids, attention_mask=mask.astype(bool), lora=lora)
    theirs = ref.run(ref.peft_reference(transformers_dir, "retrieval_query"), ids, mask)
    err = np.abs(np.asarray(ours.last_hidden_state) - theirs[0])[mask.astype(bool)].max()
    assert err < 1e-4, err


def test_chooser():
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert choose_implementation(bf16, 64, True, 512, backend="gpu") == "cudnn"
    assert choose_implementation(bf16, 64, False, 512, backend="gpu") == "xla"  # mask path
    assert choose_implementation(f32, 64, True, 512, backend="gpu") == "xla"
    assert choose_implementation(bf16, 64, True, 512, backend="cpu") == "xla"
    assert choose_implementation(f32, 64, True, 8192, backend="cpu") == "blockwise"
    assert choose_implementation(f32, 64, True, 1024, backend="cpu") == "blockwise"
    assert choose_implementation(f32, 64, True, 1023, backend="cpu") == "xla"
    assert choose_implementation(bf16, 64, True, 8192, backend="gpu") == "cudnn"
    assert choose_implementation(bf16, 160, True, 512, backend="gpu") == "xla"  # head_dim > 128


def test_model_object_takes_the_blockwise_path_for_long_inputs(transformers_dir, hf_config,
                                                              monkeypatch):
    """The length-based choice reaches the compiled forward (a threshold lowered to fit the
    test model's 40 positions), and the result still matches the reference."""
    import jina_jax.attention as attention
    from jina_jax import JinaEmbeddingsV3

    monkeypatch.setattr(attention, "BLOCKWISE_MIN_LENGTH", 8)
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    ids, mask = ref.padded_batch(hf_config.vocab_size)
    out = model(ids, mask, task="separation")
    assert model.forward.implementations == ["blockwise"]
    theirs = ref.run(ref.peft_reference(transformers_dir, "separation"), ids, mask)
    err = np.abs(np.asarray(out.last_hidden_state) - theirs[0])[mask.astype(bool)].max()
    assert err < 1e-4, err
