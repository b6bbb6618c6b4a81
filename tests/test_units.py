"""Pure-JAX units: the architecture table, tree helpers, LoRA stacking and task rows, the
checkpoint builders. No reference stack needed (runs without torch installed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import names
from convert.builders import AdapterBuilder, ParamBuilder
from convert.random_checkpoint import release_layout
from convert.safetensors_io import CheckpointError
from jina_jax import architecture, lora
from jina_jax.config import JinaConfig, as_dtype
from jina_jax.encoder import JinaEncoder
from jina_jax.tree import combine, copy_dicts, flatten, get_path, nest, set_path

SMALL = JinaConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=40)


# --- the table ---------------------------------------------------------------------------

@pytest.mark.parametrize("pooler", [True, False])
def test_table_shapes_equal_the_flax_modules(pooler):
    cfg = SMALL.replace(add_pooling_layer=pooler)
    ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    tree = jax.eval_shape(lambda i: JinaEncoder(cfg).init(jax.random.PRNGKey(0), i), ids)
    assert {p: tuple(v.shape) for p, v in flatten(tree["params"]).items()} == \
        architecture.param_shapes(cfg)


def test_every_table_name_parses_back_to_its_module():
    for module in architecture.MODULES:
        layer = 1 if module.layered else None
        for leaf, torch_leaf in architecture.LEAVES[module.kind].items():
            key = architecture.release_key(module.path, leaf, layer)
            for spelled in (key, "roberta." + key):
                target = names.parse(spelled)
                assert (target.module, target.param, target.layer, target.slot) == \
                    (module.path, leaf, layer, None), spelled
        for slot, runtime in enumerate(module.runtime):
            key = f"base_model.model.{runtime.format(layer)}.lora_A.weight"
            target = names.parse(key)
            assert target.module == module.path and target.layer == layer, key
            assert target.slot == (slot if len(module.runtime) > 1 else None), key
    assert names.parse("encoder.layers.0.mixer.Wqkv.bias").module == ("layers", "attn", "qkv")
    assert names.parse("layers.0.mixer.Wqkv.weight").layer == 0  # "encoder." is optional
    assert names.parse("embeddings.word_embeddings.bias") is None  # an Embedding has no bias
    assert names.parse("encoder.layers.0.mixer.Wkv.weight") is None


def test_lora_modules_and_release_layout_come_from_the_table():
    assert architecture.LORA_MODULES == {
        "word": ("embeddings", "word"), "token_type": ("embeddings", "token_type"),
        "qkv": ("layers", "attn", "qkv"), "out": ("layers", "attn", "out"),
        "fc1": ("layers", "mlp", "fc1"), "fc2": ("layers", "mlp", "fc2"),
        "pooler": ("pooler", "dense")}
    cfg = SMALL
    layout = release_layout(cfg)
    # Every base leaf of the table is in the layout, under the release's key.
    for path, shape in architecture.param_shapes(cfg).items():
        module = architecture.BY_PATH[path[:-1]]
        for layer in (range(cfg.num_hidden_layers) if module.layered else [None]):
            key = "roberta." + architecture.release_key(path[:-1], path[-1], layer)
            if path[-1] in ("kernel", "embedding"):
                key = key[: -len(".weight")] + ".parametrizations.weight.original"
            per_layer = shape[1:] if module.layered else shape
            expect = per_layer[::-1] if path[-1] == "kernel" else per_layer
            assert layout.pop(key)[0] == tuple(expect), key
    # What is left is exactly the stacked factors of the Linears and Embeddings.
    assert layout and all(".parametrizations.weight.0.lora_" in k for k in layout)
    assert layout["roberta.encoder.layers.1.mlp.fc1.parametrizations.weight.0.lora_A"][0] == \
        (5, 4, 24)


def test_weight_shape_refuses_norms_and_absent_modules():
    assert architecture.weight_shape(SMALL, ("layers", "mlp", "fc1")) == (24, 40)
    with pytest.raises(KeyError):
        architecture.weight_shape(SMALL, ("layers", "norm1"))
    with pytest.raises(KeyError):
        architecture.weight_shape(SMALL.replace(add_pooling_layer=False), ("pooler", "dense"))


# --- tree helpers ---------------------------------------------------------------------------

def test_tree_helpers():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    flat = flatten(tree)
    assert flat == {("a", "b"): 1, ("a", "c", "d"): 2, ("e",): 3}
    assert nest(flat) == tree
    copy = copy_dicts(tree)
    set_path(copy, ("a", "c", "d"), 5)
    assert get_path(tree, ("a", "c", "d")) == 2 and get_path(copy, ("a", "c", "d")) == 5
    set_path(copy, ("x", "y"), 7)
    assert copy["x"] == {"y": 7}
    with pytest.raises(KeyError):
        get_path(tree, ("a", "z"))
    assert combine({"a": {"b": 1}}, {"a": {"c": 2}, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}


def test_dtype_names():
    assert as_dtype("bf16") == jnp.bfloat16 and as_dtype("float32") == np.float32
    with pytest.raises(ValueError, match="dtype 'int4' is not supported"):
        as_dtype("int4")


# --- LoRA ---------------------------------------------------------------------------------

def _adapter(rng, rank, modules, n_layers=2):
    out = {}
    for name in modules:
        path = architecture.LORA_MODULES[name]
        rows, cols = architecture.weight_shape(SMALL, path)
        lead = (n_layers,) if architecture.BY_PATH[path].layered else ()
        set_path(out, path, {"a": rng.standard_normal(lead + (rows, rank)).astype(np.float32),
                             "b": rng.standard_normal(lead + (rank, cols)).astype(np.float32)})
    return out


def test_stack_pads_ranks_fills_missing_modules_and_folds_scales():
    rng = np.random.default_rng(0)
    first = _adapter(rng, 2, ["qkv", "word"])
    second = _adapter(rng, 3, ["qkv", "fc1"])
    stacked = lora.stack([first, second], [0.5, 2.0])
    qkv = stacked["layers"]["attn"]["qkv"]
    assert qkv["a"].shape == (2, 2, 24, 3) and qkv["b"].shape == (2, 2, 3, 72)  # [L, T, ...]
    for t, (adapter, scale) in enumerate([(first, 0.5), (second, 2.0)]):
        want = np.einsum("lir,lro->lio", adapter["layers"]["attn"]["qkv"]["a"],
                         adapter["layers"]["attn"]["qkv"]["b"]) * scale
        got = np.einsum("lir,lro->lio", qkv["a"][:, t], qkv["b"][:, t])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A module one task lacks is zero for it; a task's word factors sit on axis 0 (no layers).
    assert not np.asarray(stacked["layers"]["mlp"]["fc1"]["b"][:, 0]).any()
    assert stacked["embeddings"]["word"]["a"].shape == (2, 50, 2)
    assert not np.asarray(stacked["embeddings"]["word"]["b"][1]).any()


def test_merge_equals_the_low_rank_path():
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32),
        jax.eval_shape(lambda i: JinaEncoder(SMALL).init(jax.random.PRNGKey(0), i),
                       jax.ShapeDtypeStruct((1, 4), jnp.int32))["params"])
    adapter = _adapter(rng, 2, ["qkv", "out", "fc1", "fc2", "word", "pooler"])
    merged, word = lora.merge(params, adapter, 0.7)
    ids = jnp.asarray(rng.integers(0, 50, (3, 6)), jnp.int32)
    lengths = jnp.asarray([6, 4, 2], jnp.int32)
    module = JinaEncoder(SMALL)
    by_merge = module.apply({"params": merged}, ids, lengths=lengths, lora=word)
    by_rows = module.apply({"params": params}, ids, lengths=lengths,
                           lora=lora.stack([adapter], [0.7]))
    for a, b in zip(jax.tree_util.tree_leaves(by_merge), jax.tree_util.tree_leaves(by_rows)):
        np.testing.assert_allclose(np.asarray(a)[:, :2], np.asarray(b)[:, :2], atol=1e-4)
    # The word-embedding table is never copied: its factors ride along instead.
    assert merged["embeddings"]["word"]["embedding"] is params["embeddings"]["word"]["embedding"]


def test_task_rows():
    names_, index, mask = lora.task_rows(["b", None, "a", "b"])
    assert names_ == ["a", "b"]
    assert index.tolist() == [1, 0, 0, 1] and mask.tolist() == [1, 0, 1, 1]
    assert lora.task_rows([None, None])[0] == []


def test_single_task_factors_share_one_structure_and_equal_the_stack():
    rng = np.random.default_rng(2)
    adapters = {"a": _adapter(rng, 2, ["qkv", "word"]), "b": _adapter(rng, 3, ["qkv", "fc1"])}
    scales = {"a": 0.5, "b": 2.0}
    stacked = lora.stack([adapters["a"], adapters["b"]], [0.5, 2.0])
    trees = {t: lora.single_task(adapters, scales, t) for t in ("a", "b", None)}
    shapes = {t: jax.tree_util.tree_map(np.shape, tree) for t, tree in trees.items()}
    assert shapes["a"] == shapes["b"] == shapes[None]  # one compiled forward for any task
    assert shapes["a"]["layers"]["attn"]["qkv"]["a"] == (2, 1, 24, 3)  # [L, T=1, I, R]
    assert shapes["a"]["embeddings"]["word"]["b"] == (1, 2, 24)  # [T=1, R, H]
    for t, (i, tree) in (("a", (0, trees["a"])), ("b", (1, trees["b"]))):
        for path, fac in lora.adapted_modules(tree):
            axis = 1 if architecture.BY_PATH[path].layered else 0
            for k in "ab":
                np.testing.assert_array_equal(
                    fac[k], np.take(get_path(stacked, path)[k], [i], axis=axis))
    assert not any(np.asarray(x).any() for x in jax.tree_util.tree_leaves(trees[None]))
    assert lora.single_task({}, {}, None) is None


def test_task_cache_is_lru_bounded():
    rng = np.random.default_rng(2)
    adapters = {t: _adapter(rng, 1, ["fc1"]) for t in "abc"}
    scales = dict.fromkeys("abc", 1.0)
    cache = lora.TaskCache(max_tasks=2)
    first = cache.single("a", adapters, scales)
    assert cache.single("a", adapters, scales) is first
    cache.single("b", adapters, scales)
    cache.single("c", adapters, scales)
    assert list(cache.single_tasks) == ["b", "c"]
    cache.clear()
    assert not cache.single_tasks


# --- builders -----------------------------------------------------------------------------

def test_param_builder_fills_fused_qkv_from_thirds_and_refuses_holes():
    cfg = SMALL.replace(num_hidden_layers=1, add_pooling_layer=False)
    builder = ParamBuilder(cfg, np.float32, "src")
    rng = np.random.default_rng(3)
    thirds = [rng.standard_normal((24, 24)).astype(np.float32) for _ in range(3)]
    for slot, w in enumerate(thirds):
        key = f"layers.0.self_attn.{'qkv'[slot]}_proj.weight"
        builder.put(names.parse(key), w, key, "f")
    with pytest.raises(CheckpointError, match="sets layers/attn/qkv/kernel a second time"):
        builder.put(names.parse("encoder.layers.0.mixer.Wqkv.weight"),
                    np.zeros((72, 24), np.float32), "encoder.layers.0.mixer.Wqkv.weight", "f")
    with pytest.raises(CheckpointError, match="src: missing key"):
        builder.finish()
    kernel = builder.arrays[("layers", "attn", "qkv", "kernel")][0]
    np.testing.assert_array_equal(kernel, np.concatenate([w.T for w in thirds], axis=1))
    with pytest.raises(CheckpointError, match="has shape \\[3, 24\\]"):
        builder.put(names.parse("emb_ln.weight"), np.zeros((3, 24), np.float32),
                    "emb_ln.weight", "f")


def test_adapter_builder_fuses_split_qkv_block_diagonally():
    cfg = SMALL.replace(num_hidden_layers=1)
    builder = AdapterBuilder(cfg, "src")
    rng = np.random.default_rng(4)
    parts = {}
    for slot, proj in enumerate("qkv"):
        a = rng.standard_normal((24, 2)).astype(np.float32)
        b = rng.standard_normal((2, 24)).astype(np.float32)
        parts[proj] = (a, b)
        for factor, value in (("a", a), ("b", b)):
            key = f"layers.0.self_attn.{proj}_proj.lora_{factor.upper()}.weight"
            builder.put("t", names.parse(key), factor, value, key, "f")
    qkv = builder.finish()["t"]["layers"]["attn"]["qkv"]
    assert qkv["a"].shape == (1, 24, 6) and qkv["b"].shape == (1, 6, 72)
    delta = qkv["a"][0] @ qkv["b"][0]
    for slot, proj in enumerate("qkv"):
        a, b = parts[proj]
        np.testing.assert_allclose(delta[:, slot * 24:(slot + 1) * 24], a @ b, rtol=1e-5,
                                   atol=1e-5)
    lonely = AdapterBuilder(cfg, "src")
    key = "layers.0.mlp.fc1.lora_A.weight"
    lonely.put("t", names.parse(key), "a", np.zeros((24, 2), np.float32), key, "f")
    with pytest.raises(CheckpointError, match="has no matching lora_B"):
        lonely.finish()
