"""Data parallelism on 4 simulated CPU devices (in a subprocess: the device count is fixed at
JAX start-up)."""

import os
import subprocess
import sys

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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", CODE, transformers_dir], capture_output=True,
                         text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
