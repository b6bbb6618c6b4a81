"""The NNX form of the encoder: the same numbers as the Linen forward, and trainable inside a
user's NNX model with `nnx.Optimizer`, with the gradients and the update of our own Trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jina_jax import JinaEmbeddingsV3, JinaEncoderNNX, losses
from jina_jax.training import Contrastive, Trainer
from tests import reference as ref

LENGTHS = (11, 7, 1, 4)
TEMPERATURE = 0.07


@pytest.fixture(scope="module")
def model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


def _linen(model, ids, lengths, task):
    """The Linen forward on the unmerged path, as the mixed-task batches run it."""
    inputs = model.task_inputs(task, ids.shape[0], merge=False)
    return model.module().apply({"params": inputs.pop("params")}, ids, lengths=lengths, **inputs)


@pytest.mark.parametrize("task", [None, "retrieval.query",
                                  ["retrieval.passage", None, "text-matching", "retrieval_passage"]],
                         ids=["no-task", "one-task", "mixed"])
def test_nnx_forward_equals_linen(model, hf_config, task):
    ids, mask = ref.padded_batch(hf_config.vocab_size, LENGTHS)
    ids, lengths = jnp.asarray(ids, jnp.int32), jnp.asarray(mask.sum(1), jnp.int32)
    encoder = model.to_nnx()
    got = encoder(ids, lengths=lengths, task=task)
    want = _linen(model, ids, lengths, task)
    np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.pooler_output, want.pooler_output, atol=1e-6, rtol=0)
    # ... and the model's own forward (one task: merged weights), through a mask.
    merged = model(np.asarray(ids), mask, task=task)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got.last_hidden_state)[real],
                               np.asarray(merged.last_hidden_state)[real], atol=1e-5, rtol=0)


def test_nnx_mask_path_and_jit(model, hf_config):
    """Left padding through a mask, jitted with nnx.jit (the task is static)."""
    ids, mask = ref.padded_batch(hf_config.vocab_size, LENGTHS, left=True)
    encoder = model.to_nnx()
    run = nnx.jit(lambda enc, ids, mask: enc(ids, attention_mask=mask,
                                             task="retrieval.query").last_hidden_state)
    got = np.asarray(run(encoder, jnp.asarray(ids), jnp.asarray(mask)))
    want = np.asarray(model(ids, mask, task="retrieval.query").last_hidden_state)
    np.testing.assert_allclose(got[mask.astype(bool)], want[mask.astype(bool)], atol=1e-5,
                               rtol=0)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        encoder(jnp.asarray(ids), attention_mask=jnp.asarray(mask), task="nope")


class RetrievalTower(nnx.Module):
    """A user's model: our encoder as a submodule, queries and passages through their own
    adapters, InfoNCE on the mean-pooled embeddings."""

    def __init__(self, encoder: JinaEncoderNNX):
        self.encoder = encoder

    def __call__(self, batch):
        q = self.encoder.embed(batch["query_ids"], batch["query_lengths"], "retrieval.query",
                               normalize=False)
        p = self.encoder.embed(batch["positive_ids"], batch["positive_lengths"],
                               "retrieval.passage", normalize=False)
        loss, _ = losses.info_nce(q, p, None, TEMPERATURE)
        return loss


def _batch(vocab):
    q, qm = ref.padded_batch(vocab, (5, 9, 3, 7), seed=1)
    p, pm = ref.padded_batch(vocab, (12, 4, 8, 10), seed=2)
    as_ids = lambda x: jnp.asarray(x, jnp.int32)
    return {"query_ids": as_ids(q), "query_lengths": as_ids(qm.sum(1)),
            "positive_ids": as_ids(p), "positive_lengths": as_ids(pm.sum(1))}


TRAINED = nnx.All(nnx.LoRAParam, nnx.Any(nnx.PathContains("retrieval.query"),
                                         nnx.PathContains("retrieval.passage")))


def test_nnx_lora_training_matches_trainer(original_fp32, hf_config):
    """Release-format adapters (fused qkv, no block mask): the NNX gradients of both retrieval
    adapters and one AdamW update equal the project's Trainer's."""
    folder, _ = original_fp32
    model = JinaEmbeddingsV3.from_pretrained(folder)
    batch = _batch(hf_config.vocab_size)
    trainer = Trainer(model, Contrastive(temperature=TEMPERATURE), optax.adamw(1e-3),
                      dropout=False)
    state = trainer.init()
    loss_ref, _, grads_ref = trainer.gradients(state, batch)
    stepped, _ = trainer.step(state, batch)

    tower = RetrievalTower(JinaEncoderNNX.from_pretrained(folder))
    loss, grads = nnx.value_and_grad(lambda m: m(batch), argnums=nnx.DiffState(0, TRAINED))(tower)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    got = nnx.to_pure_dict(grads)["encoder"]["adapters"]
    for task in ("retrieval.query", "retrieval.passage"):
        want = jax.tree_util.tree_leaves_with_path(grads_ref["adapters"][task])
        scale = max(float(jnp.abs(g).max()) for _, g in want)
        assert scale > 0
        for path, g in want:
            leaf = got[task]
            for key in path:
                leaf = leaf[key.key]
            np.testing.assert_allclose(leaf, g, atol=1e-5 * scale, rtol=0,
                                       err_msg=f"{task}{jax.tree_util.keystr(path)}")

    optimizer = nnx.Optimizer(tower, optax.adamw(1e-3), wrt=TRAINED)

    @nnx.jit
    def train_step(tower, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: m(batch),
                                         argnums=nnx.DiffState(0, TRAINED))(tower)
        optimizer.update(tower, grads)
        return loss

    train_step(tower, optimizer, batch)
    trained = tower.encoder.weights()["adapters"]
    for task in ("retrieval.query", "retrieval.passage"):
        for (path, want), got_leaf in zip(
                jax.tree_util.tree_leaves_with_path(stepped.params["adapters"][task]),
                jax.tree_util.tree_leaves(trained[task])):
            np.testing.assert_allclose(got_leaf, want, atol=1e-6, rtol=0,
                                       err_msg=f"{task}{jax.tree_util.keystr(path)}")
    # Only the filtered adapters moved; the base weights and the other adapters did not.
    before = model.to_nnx().weights()
    untouched = jax.tree_util.tree_leaves(before["adapters"]["text-matching"])
    for a, b in zip(untouched, jax.tree_util.tree_leaves(trained["text-matching"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(before["params"]),
                    jax.tree_util.tree_leaves(tower.encoder.weights()["params"])):
        np.testing.assert_array_equal(a, b)
    # What was trained goes back into the embedding model.
    model.update({"adapters": {t: trained[t] for t in ("retrieval.query", "retrieval.passage")}})
    ids, lengths = batch["query_ids"], batch["query_lengths"]
    np.testing.assert_allclose(
        np.asarray(model.pooled(np.asarray(ids), np.asarray(lengths), "retrieval.query")),
        np.asarray(tower.encoder.embed(ids, lengths, "retrieval.query", normalize=False)),
        atol=1e-5, rtol=0)
