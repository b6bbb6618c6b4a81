"""Multi-host JAX for real: 2 processes on 127.0.0.1 joined by `jax.distributed.initialize`
(CPU, gloo collectives, 2 host devices each = a 4-device global mesh), against one process
with 4 devices. Every process is a fresh interpreter (the device count and the distributed
runtime are fixed at JAX start-up), started and waited for with a bound."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow")  # the corpus job's Parquet (the [data] extra)
from jina_jax import open_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv: process id, process count, coordinator port, checkpoint, output prefix, corpus file
WORKER = r"""
import sys
import jax
pid, count, port, ckpt, out, corpus = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                       sys.argv[4], sys.argv[5], sys.argv[6])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if count > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count,
                               process_id=pid, initialization_timeout=300,
                               # a loaded CI machine can starve the heartbeat threads
                               heartbeat_timeout_seconds=900)
import numpy as np, optax
from jax.experimental import multihost_utils
import jina_jax.sharding
from jina_jax import JinaEmbeddingsV3
from jina_jax.training import Contrastive, Trainer
from tests.test_training import contrastive_arrays
from tests.test_encode import CORPUS
jina_jax.sharding.MIN_SHARDED_SIZE = 0  # the test model's weights are all small
assert (jax.process_count(), len(jax.devices()), len(jax.local_devices())) == (count, 4, 4 // count)
batch, *_ = contrastive_arrays(120)
rows = len(batch["query_ids"])
mine = slice(pid * rows // count, (pid + 1) * rows // count)  # this process's rows only
local = {k: v[mine] for k, v in batch.items()}
result = {}
for split in (False, True):
    model = JinaEmbeddingsV3.from_pretrained(ckpt).shard(shard_params=split)
    trainer = Trainer(model, Contrastive(), optax.adamw(1e-3), dropout=True)
    state = trainer.init(seed=3)
    for _ in range(2):
        state, metrics = trainer.step(state, local)
    result[f"loss{split:d}"] = np.asarray(metrics["loss"])
    for i, leaf in enumerate(jax.tree_util.tree_leaves(state)):
        # split leaves live partly in the other process: gather them whole
        result[f"state{split:d}.{i}"] = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    if count > 1 and split:
        try:
            trainer.step(state, {k: v[:1] for k, v in local.items()})
        except ValueError as e:
            assert "runs on 2 devices of this process (of 4 in 2 processes)" in str(e), e
        else:
            raise AssertionError("1 row for 2 local devices should fail")
        try:  # a forward on a mesh this process cannot fully address is refused
            model.encode(CORPUS[:2], task=None, max_length=24)
        except ValueError as e:
            assert "model.shard(jax.local_devices())" in str(e), e
        else:
            raise AssertionError("encode over a multi-host mesh should fail")
# Embedding per process: each shards over its own devices and embeds its own texts.
model = JinaEmbeddingsV3.from_pretrained(ckpt).shard(jax.local_devices())
texts = CORPUS[pid::count]
result["embedding"] = model.encode(texts, task="retrieval.passage", max_length=24)
# The corpus job: under jax.distributed each process takes its own shards (process index and
# count) into one folder.
from jina_jax.data.job import CorpusJob, embed_corpus
job = CorpusJob(inputs=(corpus,), task="retrieval.passage", max_length=24, id_field="doc",
                shard_rows=5)
summary = embed_corpus(model, job, out + ".dataset", batch_size=8, progress=False, log=None)
result["corpus"] = np.array([*summary.process, summary.rows, summary.shards_written])
np.savez(f"{out}.{pid}.npz", **result)
if count > 1:  # leave together: the coordinator lives in process 0
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()
print("ok", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(count: int, ckpt: str, out: str, corpus: str, timeout: float = 600):
    """`count` worker processes (ids 0..count-1) with 4 // count CPU devices each; returns their
    outputs; every process is killed if one fails or the bound passes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // count}")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(count), port, ckpt, out,
                               corpus],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(count)]
    try:
        logs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (stdout, stderr)) in enumerate(zip(procs, logs)):
        assert p.returncode == 0 and stdout.strip().endswith("ok"), \
            f"process {i} of {count}: rc {p.returncode}\n{stderr[-3000:]}"
    return [dict(np.load(f"{out}.{i}.npz")) for i in range(count)]


def test_two_processes_equal_one(transformers_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    words = ["alpha", "beta", "gamma", "über", "東京", "delta"]
    rng = np.random.default_rng(0)
    corpus.write_text("".join(json.dumps({"doc": f"d{i}", "text": " ".join(
        rng.choice(words, size=int(rng.integers(1, 7))))}, ensure_ascii=False) + "\n"
        for i in range(23)), encoding="utf-8")
    (single,) = run_processes(1, transformers_dir, str(tmp_path / "single"), str(corpus))
    multi = run_processes(2, transformers_dir, str(tmp_path / "multi"), str(corpus))
    for split in (0, 1):
        keys = sorted(k for k in single if k.startswith(f"state{split}."))
        assert keys and all(k in multi[0] for k in keys)
        for got in multi:  # both processes hold the same state, equal to one process's
            assert abs(float(got[f"loss{split}"]) - float(single[f"loss{split}"])) < 1e-5
            for k in keys:
                diff = np.abs(got[k].astype(np.float64) - single[k].astype(np.float64)).max()
                assert diff < 1e-5, (k, diff)
    embedding = np.empty_like(single["embedding"])
    embedding[0::2], embedding[1::2] = multi[0]["embedding"], multi[1]["embedding"]
    assert np.abs(embedding - single["embedding"]).max() < 1e-6
    # the corpus job: 23 rows in 5 shards; process i of 2 wrote shards i, i + 2, ...
    assert single["corpus"].tolist() == [0, 1, 23, 5]
    assert [m["corpus"].tolist() for m in multi] == [[0, 2, 13, 3], [1, 2, 10, 2]]
    one = open_dataset(str(tmp_path / "single.dataset"), verify=True)
    two = open_dataset(str(tmp_path / "multi.dataset"), verify=True)
    assert one.ids.to_pylist() == two.ids.to_pylist() == [f"d{i}" for i in range(23)]
    assert np.abs(one.embeddings - two.embeddings).max() < 1e-6
    assert sorted(os.listdir(tmp_path / "multi.dataset")) == \
        sorted(os.listdir(tmp_path / "single.dataset"))
