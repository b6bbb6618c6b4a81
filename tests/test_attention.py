"""The attention implementations agree, and the chooser picks the documented one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jina_jax import JinaEncoder
from jina_jax.attention import (
    blockwise_attention,
    choose_implementation,
    dot_product_attention,
    grouped_attention,
)
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


# group_bytes: one pair a step (9 steps of the lax.map), three pairs (a step per row), every
# pair at once (no loop), and the default.
@pytest.mark.parametrize("group_bytes", [1, 3 * 300 * 300 * 4, 9 * 300 * 300 * 4, None])
def test_grouped_equals_plain(group_bytes):
    q, k, v = _qkv()
    mask = np.ones((3, 300), bool)
    mask[0, 250:] = False          # right padding
    mask[1, :40] = False           # left padding
    mask[2, 100:170] = False       # a hole
    plain = dot_product_attention(q, k, v, mask=jnp.asarray(mask), implementation="xla")
    grouped = grouped_attention(q, k, v, jnp.asarray(mask), group_bytes=group_bytes)
    assert grouped.shape == plain.shape and grouped.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(plain), atol=1e-5)
    # Through the dispatcher, right-padded lengths (the form encode passes).
    lengths = jnp.asarray([300, 123, 1], jnp.int32)
    np.testing.assert_allclose(
        np.asarray(dot_product_attention(q, k, v, lengths=lengths, implementation="grouped")),
        np.asarray(dot_product_attention(q, k, v, lengths=lengths, implementation="xla")),
        atol=1e-5)


def test_grouped_bf16_close():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(l=200))
    plain = dot_product_attention(q, k, v, implementation="xla").astype(jnp.float32)
    grouped = grouped_attention(q, k, v, group_bytes=1)
    assert grouped.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grouped, np.float32), np.asarray(plain),
                               rtol=2e-2, atol=2e-2)


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
    assert choose_implementation(f32, 64, True, 8192, backend="cpu") == "grouped"
    assert choose_implementation(f32, 64, True, 1024, backend="cpu") == "grouped"
    assert choose_implementation(f32, 64, True, 384, backend="cpu") == "grouped"
    assert choose_implementation(f32, 64, False, 384, backend="cpu") == "grouped"  # a mask
    assert choose_implementation(f32, 64, True, 383, backend="cpu") == "blockwise"
    assert choose_implementation(f32, 64, True, 128, backend="cpu") == "blockwise"
    assert choose_implementation(f32, 64, True, 127, backend="cpu") == "xla"
    # Training on a CPU keeps XLA's attention below BLOCKWISE_MIN_LENGTH (its backward).
    assert choose_implementation(f32, 64, True, 1023, backend="cpu", training=True) == "xla"
    assert choose_implementation(f32, 64, True, 1024, backend="cpu", training=True) == "blockwise"
    # bf16 on a CPU was not measured on the grouped path: the long-sequence rule.
    assert choose_implementation(bf16, 64, True, 1023, backend="cpu") == "xla"
    assert choose_implementation(bf16, 64, True, 1024, backend="cpu") == "blockwise"
    assert choose_implementation(f32, 64, True, 8192, backend="tpu") == "splash"
    assert choose_implementation(f32, 64, True, 1023, backend="gpu") == "xla"
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


def test_model_object_takes_the_grouped_path(transformers_dir, hf_config, monkeypatch):
    """A CPU fp32 forward of long rows reaches the grouped path (thresholds lowered to fit the
    test model's 40 positions; a group of one (row, head) pair, so the lax.map runs), and both
    padding forms still match the reference."""
    import jina_jax.attention as attention
    from jina_jax import JinaEmbeddingsV3

    monkeypatch.setattr(attention, "CPU_INFERENCE_GROUPED_MIN_LENGTH", 8)
    monkeypatch.setattr(attention, "GROUP_LOGITS_BYTES", 1)
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    for left in (False, True):
        ids, mask = ref.padded_batch(hf_config.vocab_size, left=left)
        out = model(ids, mask, task="retrieval.query")
        assert model.forward.implementations[-1] == "grouped"
        theirs = ref.run(ref.peft_reference(transformers_dir, "retrieval_query"), ids, mask)
        err = np.abs(np.asarray(out.last_hidden_state) - theirs[0])[mask.astype(bool)].max()
        assert err < 1e-4, (left, err)


# --- the TPU kernel (Pallas splash attention), run on this CPU in interpret mode --------------

def _splash_case(b, l, n, d, lengths, dtype, seed=0):
    from jina_jax.attention import splash_attention

    q, k, v = (x.astype(dtype) for x in _qkv(b, l, n, d, seed))
    lengths = jnp.asarray(lengths, jnp.int32)
    real = np.arange(l)[None, :] < np.asarray(lengths)[:, None]
    ours = splash_attention(q, k, v, lengths, interpret=True)
    theirs = dot_product_attention(q, k, v, lengths=lengths, implementation="xla")
    return q, k, v, lengths, real, ours, theirs


def test_splash_fp32_equals_xla_on_padded_rows():
    """fp32, right-padded rows of several lengths, a width that is no multiple of 128 (padded
    inside the kernel wrapper): every real token within 1e-5 of XLA's attention."""
    *_, real, ours, theirs = _splash_case(3, 200, 2, 64, [200, 130, 1], jnp.float32)
    assert ours.shape == theirs.shape and ours.dtype == jnp.float32
    err = np.abs(np.asarray(ours) - np.asarray(theirs))[real].max()
    assert err <= 1e-5, err


def test_splash_bf16_close_to_xla():
    *_, real, ours, theirs = _splash_case(2, 256, 2, 64, [256, 77], jnp.bfloat16)
    assert ours.dtype == jnp.bfloat16
    a = np.asarray(ours, np.float32)[real].reshape(-1, 64)
    b = np.asarray(theirs, np.float32)[real].reshape(-1, 64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() >= 0.9999, cos.min()


def test_splash_backward_equals_xla():
    """The gradients (the kernel's own backward: dq and dk/dv kernels) of a loss over the real
    tokens match XLA's, padding keys included (zero on both)."""
    from jina_jax.attention import splash_attention

    q, k, v = _qkv(2, 128, 2, 64, seed=3)
    lengths = jnp.asarray([128, 50], jnp.int32)
    real = jnp.asarray(np.arange(128)[None, :] < np.asarray(lengths)[:, None])
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    def loss(attend):
        return lambda q, k, v: (attend(q, k, v) * w * real[..., None, None]).sum()

    ours = jax.grad(loss(lambda q, k, v: splash_attention(q, k, v, lengths, interpret=True)),
                    argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(loss(lambda q, k, v: dot_product_attention(
        q, k, v, lengths=lengths, implementation="xla")), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, theirs):
        err = float(np.abs(np.asarray(a) - np.asarray(b)).max())
        assert err <= 1e-5, (name, err)


def test_splash_is_chosen_on_tpu_only():
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert choose_implementation(bf16, 64, True, 512, backend="tpu") == "splash"
    assert choose_implementation(f32, 64, True, 8192, backend="tpu") == "splash"
    assert choose_implementation(bf16, 64, True, 64, backend="tpu") == "xla"  # below 128
    assert choose_implementation(bf16, 64, False, 512, backend="tpu") == "xla"  # a mask
    assert choose_implementation(bf16, 64, True, 8192, backend="cpu") == "blockwise"
    with pytest.raises(ValueError, match="right-padded"):
        dot_product_attention(*_qkv(1, 8, 1, 8), mask=jnp.ones((1, 8), bool),
                              implementation="splash")


@pytest.mark.slow
@pytest.mark.parametrize("length,real", [(2048, 1500), (8192, 8000)])
def test_splash_long_sequences(length, real):
    """Long rows, as the 8192-token contexts run: fp32 within 1e-5 of the blockwise path (XLA's
    [B, N, L, L] logits would need 4 GiB a head pair at 8192)."""
    from jina_jax.attention import splash_attention

    q, k, v = _qkv(1, length, 2, 64, seed=5)
    lengths = jnp.asarray([real], jnp.int32)
    ours = splash_attention(q, k, v, lengths, interpret=True)
    mask = jnp.arange(length)[None, :] < lengths[:, None]
    theirs = blockwise_attention(q, k, v, mask)
    err = np.abs(np.asarray(ours) - np.asarray(theirs))[0, :real].max()
    assert err <= 1e-5, err
