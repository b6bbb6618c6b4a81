"""Data parallelism on 4 simulated CPU devices (in a subprocess: the device count is fixed at
JAX start-up)."""

import os
import subprocess
import sys


def _run_on_devices(code: str, transformers_dir: str, devices: int, timeout: int):
    """Runs `code` in a subprocess that sees `devices` simulated CPU devices (the count is fixed
    at JAX start-up); it must exit 0 and print "ok" last."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code, transformers_dir], capture_output=True,
                         text=True, env=env, cwd=root, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")

CODE = r"""
import sys
import jax, numpy as np
from jina_jax import JinaEmbeddingsV3
from tests.test_encode import CORPUS
assert len(jax.devices()) == 4, jax.devices()
single = JinaEmbeddingsV3.from_pretrained(sys.argv[1])
sharded = JinaEmbeddingsV3.from_pretrained(sys.argv[1]).shard()
for task in ("retrieval.query", None, ["separation", None] * 4):
    a = single.encode(CORPUS, task=task, max_length=24)
    b = sharded.encode(CORPUS, task=task, max_length=24)
    assert np.abs(a - b).max() < 1e-5, np.abs(a - b).max()
ids = np.full((4, 6), 5, np.int32)
out = sharded(ids, np.ones_like(ids), task="classification").last_hidden_state
assert len(out.sharding.device_set) == 4, out.sharding
assert out.addressable_shards[0].data.shape == (1, 6, 48)
ref = single(ids, np.ones_like(ids), task="classification").last_hidden_state
assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 1e-5
try:
    sharded(ids[:3], np.ones_like(ids[:3]))
except ValueError as e:
    assert "does not split over 4 devices" in str(e)
else:
    raise AssertionError("3 rows on 4 devices should fail")
print("ok")
"""


def test_sharded_encode_equals_single_device(transformers_dir):
    _run_on_devices(CODE, transformers_dir, devices=4, timeout=600)


TRAIN_CODE = r"""
import sys
import jax, numpy as np, optax
from jina_jax import JinaEmbeddingsV3
import jina_jax.sharding
from jina_jax.training import Contrastive, Trainer
from tests.test_training import contrastive_arrays
jina_jax.sharding.MIN_SHARDED_SIZE = 0  # the test model's weights are all small
assert len(jax.devices()) == 4, jax.devices()
batch, *_ = contrastive_arrays(120)
results = []
for shard in (False, True, "params"):
    model = JinaEmbeddingsV3.from_pretrained(sys.argv[1])
    if shard:
        model.shard(shard_params=shard == "params")
    trainer = Trainer(model, Contrastive(), optax.adamw(1e-3), dropout=True, accumulate=1)
    state = trainer.init(seed=3)
    for _ in range(2):
        state, metrics = trainer.step(state, batch)
    results.append((state, metrics))
    if shard:
        leaf = jax.tree_util.tree_leaves(state.params)[0]
        assert len(leaf.sharding.device_set) == 4, leaf.sharding
        placed = trainer.place_batch(batch)["query_ids"]
        assert len(placed.sharding.device_set) == 4
        assert placed.addressable_shards[0].data.shape[0] == 1, placed.sharding
        try:
            trainer.step(state, {k: v[:2] for k, v in batch.items()})
        except ValueError as e:
            assert "runs on 4 devices" in str(e), e
        else:
            raise AssertionError("2 rows on 4 devices should fail")
    if shard == "params":  # the word-embedding factor a [V=120, r] is split over the devices
        word = state.params["adapters"]["retrieval.query"]["embeddings"]["word"]["a"]
        assert word.addressable_shards[0].data.shape[0] == word.shape[0] // 4, word.sharding
        table = trainer.frozen["params"]["embeddings"]["word"]["embedding"]
        assert table.addressable_shards[0].data.shape[0] == table.shape[0] // 4, table.sharding
(s1, m1), *others = results
for s4, m4 in others:
    assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s4)):
        assert np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() < 1e-5
print("ok")
"""


def test_sharded_train_step_equals_single_device(transformers_dir):
    _run_on_devices(TRAIN_CODE, transformers_dir, devices=4, timeout=600)


MESH_CODE = r"""
import sys
import jax, numpy as np, optax
from jax.sharding import PartitionSpec as P
from jina_jax import JinaEmbeddingsV3
from jina_jax.training import Contrastive, Trainer
from tests.test_encode import CORPUS
from tests.test_training import contrastive_arrays
assert len(jax.devices()) == 8, jax.devices()
mesh = jax.make_mesh((2, 4), ("data", "model"))   # explicit axes, as JAX makes them by default
single = JinaEmbeddingsV3.from_pretrained(sys.argv[1])
split = JinaEmbeddingsV3.from_pretrained(sys.argv[1]).shard(mesh=mesh, model_axis="model")
with jax.set_mesh(mesh):  # the mesh in context, and calls made under it
    ambient = JinaEmbeddingsV3.from_pretrained(sys.argv[1]).shard(model_axis="model")
    assert ambient.layout.mesh.shape == mesh.shape and ambient.row_multiple == 2
    c = ambient.encode(CORPUS, task="retrieval.query", max_length=24)
assert split.row_multiple == 2
# The weights really are split: heads / MLP units over "model", whole over "data".
layers = split.params["layers"]
for name, spec, local in ((("attn", "qkv", "kernel"), P(None, None, "model"), (3, 48, 36)),
                          (("attn", "qkv", "bias"), P(None, "model"), (3, 36)),
                          (("attn", "out", "kernel"), P(None, "model"), (3, 12, 48)),
                          (("mlp", "fc1", "kernel"), P(None, None, "model"), (3, 48, 18)),
                          (("mlp", "fc2", "kernel"), P(None, "model"), (3, 18, 48))):
    leaf = layers[name[0]][name[1]][name[2]]
    assert leaf.sharding.spec == spec, (name, leaf.sharding)
    assert leaf.addressable_shards[0].data.shape == local, (name, leaf.addressable_shards[0].data.shape)
word = split.params["embeddings"]["word"]["embedding"]
assert word.sharding.spec == P(None, "model") and word.addressable_shards[0].data.shape == (120, 12)
for task in ("retrieval.query", ["separation", None] * 4):
    a = single.encode(CORPUS, task=task, max_length=24)
    b = split.encode(CORPUS, task=task, max_length=24)
    assert np.abs(a - b).max() < 1e-5, (task, np.abs(a - b).max())
    if task == "retrieval.query":
        assert np.abs(a - c).max() < 1e-5, np.abs(a - c).max()
# A train step of everything (base weights and their optimizer moments split too).
batch, *_ = contrastive_arrays(120)
results = []
for model in (JinaEmbeddingsV3.from_pretrained(sys.argv[1]),
              JinaEmbeddingsV3.from_pretrained(sys.argv[1]).shard(mesh=mesh, model_axis="model")):
    trainer = Trainer(model, Contrastive(), optax.adamw(1e-3), train="all", dropout=False)
    state, metrics = trainer.step(trainer.init(seed=3), batch)
    results.append((state, metrics))
(s1, m1), (s8, m8) = results
fc1 = s8.params["params"]["layers"]["mlp"]["fc1"]["kernel"]
assert fc1.sharding.spec == P(None, None, "model"), fc1.sharding
mu = s8.opt_state[0].mu["params"]["layers"]["mlp"]["fc1"]["kernel"]
assert mu.sharding.spec == P(None, None, "model"), mu.sharding
assert abs(float(m1["loss"]) - float(m8["loss"])) < 1e-5
for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1), jax.tree_util.tree_leaves(s8)):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
    assert d < 1e-5, (jax.tree_util.keystr(path), d)
try:
    JinaEmbeddingsV3.from_pretrained(sys.argv[1]).shard(mesh=mesh, model_axis="tensor")
except ValueError as e:
    assert "model_axis 'tensor' is not an axis of the mesh" in str(e), e
else:
    raise AssertionError("an unknown axis should fail")
print("ok")
"""


def test_data_by_model_mesh_equals_single_device(transformers_dir):
    """A 2x4 (data x model) mesh of 8 simulated devices: tensor-parallel encode and train step
    equal one device, with the weights split as `sharding.py` documents."""
    _run_on_devices(MESH_CODE, transformers_dir, devices=8, timeout=900)
