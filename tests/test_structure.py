"""The parameter tree, the scan, the hub path, the writer, the console script."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from convert.safetensors_io import SafetensorsFile, write
from jina_jax.architecture import param_shapes
from jina_jax.tree import flatten
from jina_jax import JinaConfig, JinaEmbeddingsV3, JinaEncoder
from tests import reference as ref


def _init_shapes(cfg, **kw):
    module = JinaEncoder(cfg, **kw)
    ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    tree = jax.eval_shape(lambda i: module.init(jax.random.PRNGKey(0), i), ids)["params"]
    return {p: tuple(v.shape) for p, v in flatten(tree).items()}, tree


def test_full_size_tree_without_allocating():
    cfg = JinaConfig()  # the release: 24 layers, 1024 wide, vocab 250002
    shapes, tree = _init_shapes(cfg)
    assert shapes == param_shapes(cfg)
    assert shapes[("embeddings", "word", "embedding")] == (250002, 1024)
    assert shapes[("layers", "attn", "qkv", "kernel")] == (24, 1024, 3072)
    assert shapes[("layers", "mlp", "fc1", "kernel")] == (24, 1024, 4096)
    total = sum(int(np.prod(s)) for s in shapes.values())
    v, h, f, n = 250002, 1024, 4096, 24
    per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
    assert total == v * h + h + 2 * h + n * per_layer + h * h + h == 559_364_096
    # The "about 572M" of the model card counts the five adapters' factors as well (rank 4).
    lora = 4 * (v + h) + 4 * (1 + h) + n * 4 * ((h + 3 * h) + (h + h) + (h + f) + (f + h)) + 4 * 2 * h
    assert 571e6 < total + 5 * lora < 573e6


def test_converter_tree_equals_init_tree_without_pooler():
    cfg = JinaConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=40, add_pooling_layer=False)
    shapes, _ = _init_shapes(cfg, param_dtype=jnp.bfloat16)
    assert shapes == param_shapes(cfg)


def test_scan_equals_unrolled(transformers_dir):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    ids, mask = ref.padded_batch(model.config.vocab_size)
    params, lora = model.params_for("retrieval.query")
    scanned = model(ids, mask, task="retrieval.query").last_hidden_state
    unrolled_params = dict(params)
    layers = unrolled_params.pop("layers")
    for i in range(model.config.num_hidden_layers):
        unrolled_params[f"layers_{i}"] = jax.tree_util.tree_map(lambda x: x[i], layers)
    module = JinaEncoder(model.config, scan_layers=False)
    out = module.apply({"params": unrolled_params}, ids, lengths=mask.sum(1), lora=lora)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state)[mask.astype(bool)],
                               np.asarray(scanned)[mask.astype(bool)], atol=1e-5)


def test_forward_is_a_pure_jittable_function(transformers_dir):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    ids, mask = ref.padded_batch(model.config.vocab_size)
    params, lora = model.params_for("separation", merge=False)  # what the model runs
    fn = jax.jit(lambda p, i, n: model.module().apply({"params": p}, i, lengths=n, lora=lora))
    out = fn(params, ids, mask.sum(1))
    np.testing.assert_array_equal(np.asarray(out.last_hidden_state),
                                  np.asarray(model(ids, mask, task="separation").last_hidden_state))


def test_task_cache_is_bounded(transformers_dir):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir, max_cached_tasks=2)
    first = model.params_for("separation", merge=False)
    assert model.params_for("separation", merge=False)[1] is first[1]  # cached
    for task in ("retrieval.query", "classification", "text-matching"):
        model.params_for(task, merge=False)
    assert model.cached_tasks == ["classification", "text-matching"]
    merged = model.params_for("separation")
    assert model.params_for("separation") is not merged  # merged on request, never cached
    assert model.cached_tasks == ["classification", "text-matching"]


def test_writer_output_opens_with_safetensors(tmp_path):
    import ml_dtypes

    tensors = {"a/b": np.arange(6, dtype=np.float32).reshape(2, 3),
               "c": np.ones((3,), ml_dtypes.bfloat16), "d": np.arange(5, dtype=np.int64)}
    path = tmp_path / "x.safetensors"
    write(tensors, path, metadata={"format": "jina-jax"})
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "jina-jax"}
        np.testing.assert_array_equal(f.get_tensor("a/b"), tensors["a/b"])
        np.testing.assert_array_equal(f.get_tensor("d"), tensors["d"])
    ours = SafetensorsFile(path)
    assert ours.read("c").dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.read("a/b"), tensors["a/b"])


def test_hub_id_resolves_offline_from_the_cache(tmp_path, transformers_dir, monkeypatch):
    """A hub id goes through huggingface_hub: here an offline cache laid out as the hub's."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-jina" / "snapshots" / ("0" * 40)
    shutil.copytree(transformers_dir, snapshot)
    (cache / "models--acme--tiny-jina" / "refs").mkdir()
    (cache / "models--acme--tiny-jina" / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path))
    code = ("from jina_jax import JinaEmbeddingsV3; m = JinaEmbeddingsV3.from_pretrained("
            "'acme/tiny-jina'); print(m.source); print(','.join(m.tasks))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert str(snapshot) in out.stdout and "retrieval.query" in out.stdout
    missing = subprocess.run([sys.executable, "-c", code.replace("tiny-jina", "absent")], env=env,
                             capture_output=True, text=True)
    assert missing.returncode != 0
    assert "acme/absent: not a local folder, and not found in the local hub cache" in missing.stderr


def test_console_script_convert(tmp_path, original_bf16):
    exe = shutil.which("jina-jax")
    assert exe, "the jina-jax console script is not installed (pip install -e .)"
    dst = tmp_path / "out"
    out = subprocess.run([exe, "convert", original_bf16[0], str(dst), "--dtype", "bfloat16"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "original format" in out.stdout and "5 task adapter(s)" in out.stdout
    assert SafetensorsFile(dst / "params.safetensors").read("embeddings/word/embedding").dtype.name == "bfloat16"
    again = subprocess.run([exe, "convert", original_bf16[0], str(dst)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists (add --overwrite" in again.stderr
    (dst / "stale.txt").write_text("left from before")
    forced = subprocess.run([exe, "convert", original_bf16[0], str(dst), "--force"],
                            capture_output=True, text=True)  # --force: the old spelling
    assert forced.returncode == 0, forced.stderr
    assert not (dst / "stale.txt").exists()  # replaced whole, not written over
    bad = subprocess.run([exe, "convert", str(tmp_path / "missing"), str(tmp_path / "o2")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such folder" in bad.stderr
