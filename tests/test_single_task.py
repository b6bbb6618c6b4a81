"""The single-task forward: the base weights plus one task's factors through the low-rank path,
equal to the merged weights, and no merged copy of the weights kept anywhere."""

import gc

import jax
import numpy as np

from jina_jax import JinaEmbeddingsV3
from jina_jax.executables import abstract_signature
from jina_jax.lora import adapted_modules
from jina_jax.tree import flatten
from tests import reference as ref


def _nonzero_b(adapter) -> bool:
    return any(np.asarray(fac["b"]).any() for _, fac in adapted_modules(adapter))


def test_single_task_forward_equals_the_merged_weights(transformers_dir):
    """Every task (different ranks and module subsets) and no task, on a padded batch of mixed
    lengths: the low-rank forward the model runs equals the merged parameters within 1e-5."""
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    merged_forward = jax.jit(lambda p, ids, n, lora: model.module().apply(
        {"params": p}, ids, lengths=n, lora=lora))
    base = flatten(model.params)
    ids, mask = ref.padded_batch(model.config.vocab_size, lengths=(29, 11, 2, 16, 1), seed=8)
    real = mask.astype(bool)
    for task in [*model.tasks, None]:
        if task is not None:
            assert _nonzero_b(model.adapters[task]), task
        ours = model(ids, mask, task=task)
        params, word = model.params_for(task)  # merged
        theirs = merged_forward(params, ids, mask.sum(1).astype(np.int32), word)
        err = np.abs(np.asarray(ours.last_hidden_state)
                     - np.asarray(theirs.last_hidden_state))[real].max()
        perr = np.abs(np.asarray(ours.pooler_output) - np.asarray(theirs.pooler_output)).max()
        assert err < 1e-5 and perr < 1e-5, (task, err, perr)
        # The adapter really changes the weights: the comparison sees it.
        if task is not None:
            assert any(not np.array_equal(w, base[path]) for path, w in
                       flatten(params).items() if path[0] == "layers"), task


def _weight_shaped(model) -> int:
    """Live arrays shaped like an adapted layer weight (the base one included)."""
    gc.collect()
    shapes = {np.shape(model.params["layers"][m][n]["kernel"])
              for m, n in (("attn", "qkv"), ("attn", "out"), ("mlp", "fc1"), ("mlp", "fc2"))}
    return sum(1 for x in jax.live_arrays() if x.shape in shapes)


def test_no_merged_copy_of_the_weights_is_kept(transformers_dir):
    """encode, iter_encode, late chunking and direct calls, over more tasks than the cache
    holds: no array shaped like a layer weight appears, and a forward's weight arguments are
    the base params (the same arrays) plus factors of a few kilobytes."""
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir, max_cached_tasks=2)
    before = _weight_shaped(model)
    texts = ["a short text", "a somewhat longer text than the first one", "x"]
    for task in model.tasks:
        model.encode(texts, task=task, max_length=32)
    list(model.iter_encode(texts, task="separation", max_length=32))
    model.encode_late_chunks(["One sentence. Another one here."], max_length=32)
    ids, mask = ref.padded_batch(model.config.vocab_size)
    model(ids, mask, task="classification")
    assert _weight_shaped(model) <= before

    args = model.forward_inputs(ids, mask, "retrieval.query")
    assert args["params"] is model.params
    base = {id(x) for x in jax.tree_util.tree_leaves(model.params)}
    weights = jax.tree_util.tree_leaves((args["params"], args["lora"]))
    extra = sum(x.nbytes for x in weights if id(x) not in base)
    factors = sum(x.nbytes for x in jax.tree_util.tree_leaves(args["lora"]))
    assert extra == factors
    merged = model.params_for("retrieval.query")[0]  # the copy the model used to keep
    copied = sum(x.nbytes for x in jax.tree_util.tree_leaves(merged) if id(x) not in base)
    assert factors < copied / 2, (factors, copied)
    assert len(model.cached_tasks) <= 2


def test_store_keys_tell_the_single_task_path_from_the_per_row_one(transformers_dir):
    """Every single task (and no task) shares one executable; the per-row path of the same
    task, or the merged parameters, get their own."""
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    ids, mask = ref.padded_batch(model.config.vocab_size)

    def key(task, merge=True, params=None):
        inputs = model.forward_inputs(ids, mask, task, merge=merge)
        if params is not None:
            inputs["params"], inputs["lora"] = params
        signature = abstract_signature(model.forward.arguments(**inputs))
        return model.forward.store.key(model.forward.description("xla", "pooled"), signature)

    single = {key(task) for task in [*model.tasks, None]}
    assert len(single) == 1
    assert key("separation", merge=False) not in single
    assert key("separation", params=model.params_for("separation")) not in single
