"""Embedding on Ray (jina_jax.data.ray_data): a real local Ray cluster started by this module
(`ray.init(num_cpus=2)`, shut down at its end), the tiny test model, every row equal to
`encode()` by id (1e-6), each id exactly once; an actor killed by pid mid-run; the CLI's
`--engine ray` against the local corpus job."""

import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
psutil = pytest.importorskip("psutil")

from jina_jax import JinaEmbeddingsV3, open_dataset  # noqa: E402
from jina_jax.data.job import CorpusJob, embed_corpus  # noqa: E402
from jina_jax import RayEmbedder, embed_dataset  # noqa: E402
from jina_jax.data.schema import embedding_matrix  # noqa: E402

TASK = "retrieval.passage"
MAX_LENGTH = 32
BATCH = 8  # encode's batch size everywhere: the runs share their compiled shapes
WORDS = ["alpha", "beta", "gamma", "über", "東京", "delta", "x", "long", "naïve café"]
WAIT = 240  # seconds any Ray run may take here (a shared 2-core machine)


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 9)))) for _ in range(n)]


@pytest.fixture(scope="module")
def cluster():
    # Ray's memory monitor kills workers when the whole machine is short of memory; on a shared
    # CI machine that is other jobs' memory, and these workers need ~0.5 GB each.
    saved = os.environ.get("RAY_memory_monitor_refresh_ms")
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_memory_monitor_refresh_ms", None)
        else:
            os.environ["RAY_memory_monitor_refresh_ms"] = saved


@pytest.fixture(scope="module")
def model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two Parquet files of (doc, body, year): the folder and {id: text}."""
    root = tmp_path_factory.mktemp("ray-corpus")
    texts = _texts(96, 0)
    ids = [f"doc-{i}" for i in range(len(texts))]
    for name, part in (("a.parquet", slice(0, 60)), ("b.parquet", slice(60, None))):
        pq.write_table(pa.table({"doc": ids[part], "body": texts[part],
                                 "year": list(range(len(ids[part])))}), root / name,
                       row_group_size=20)
    return root, dict(zip(ids, texts))


def _collect(ds) -> pa.Table:
    refs = ds.to_arrow_refs()
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=WAIT)
    assert len(ready) == len(refs), "the Ray run did not finish in time"
    return pa.concat_tables(ray.get(refs))


def _check(table, texts, model, column="embedding", id_column="doc"):
    ids = table.column(id_column).to_pylist()
    assert sorted(ids) == sorted(texts), "an id is missing or doubled"
    got = embedding_matrix(table.column(column))
    want = model.encode([texts[i] for i in ids], task=TASK, max_length=MAX_LENGTH,
                        batch_size=BATCH)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() < 1e-6


def test_map_batches_equals_encode(cluster, model, corpus, transformers_dir):
    root, texts = corpus
    ds = ray.data.read_parquet(str(root))
    out = embed_dataset(ds, transformers_dir, text_column="body", task=TASK,
                        max_length=MAX_LENGTH, batch_size=BATCH, batch_rows=16, actors=2)
    table = _collect(out)
    assert table.column_names == ["doc", "body", "year", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.field("element", pa.float32()),
                                                            48)
    _check(table, texts, model)


def test_batch_formats_and_task_column(model, transformers_dir):
    """The class itself on each batch format Ray hands it (no cluster needed to call it)."""
    texts = _texts(6, 1)
    tasks = [TASK, "retrieval.query", None, TASK, "text_matching", None]
    embedder = RayEmbedder(transformers_dir, task_column="task", id_column="doc",
                           max_length=MAX_LENGTH, batch_size=BATCH, truncate_dim=32)
    want = model.encode(texts, task=tasks, max_length=MAX_LENGTH, batch_size=BATCH,
                        truncate_dim=32)
    columns = {"doc": np.array([f"d{i}" for i in range(6)], dtype=object),
               "text": np.array(texts, dtype=object), "task": np.array(tasks, dtype=object)}
    table = embedder(pa.table(columns))
    assert table.column_names == ["doc", "text", "task", "embedding"]
    assert np.abs(embedding_matrix(table.column("embedding")) - want).max() < 1e-6
    out = embedder(dict(columns))
    assert np.abs(embedding_matrix(out["embedding"]) - want).max() < 1e-6
    frame = embedder(pa.table(columns).to_pandas())
    back = pa.Table.from_pandas(frame, preserve_index=False)
    assert back.schema.field("embedding").type == table.schema.field("embedding").type
    assert np.abs(embedding_matrix(back.column("embedding")) - want).max() < 1e-6
    assert embedder(pa.table({k: v[:0] for k, v in columns.items()})).num_rows == 0
    with pytest.raises(ValueError, match=r"row 2 of the batch \(id 'd2'\): null, not a string"):
        embedder({**columns, "text": np.array(texts[:2] + [None] + texts[3:], dtype=object)})
    with pytest.raises(ValueError, match=r"row 1 of the batch \(id 'd1'\): unknown task 'nope'"):
        embedder({**columns, "task": np.array([TASK, "nope"] * 3, dtype=object)})
    with pytest.raises(ValueError, match="already has a column 'embedding'"):
        embedder(table)
    with pytest.raises(ValueError, match=r"no column 'body' \(text_column\)"):
        RayEmbedder(transformers_dir, text_column="body")(columns)
    with pytest.raises(ValueError, match="task or task_column, not both"):
        RayEmbedder(transformers_dir, task=TASK, task_column="task")
    with pytest.raises(ValueError, match="needs `ranges`"):
        RayEmbedder(transformers_dir, precision="int8")
    binary = RayEmbedder(transformers_dir, task=TASK, precision="ubinary",
                         max_length=MAX_LENGTH, batch_size=BATCH)(pa.table(columns))
    packed = model.encode(texts, task=TASK, precision="ubinary", max_length=MAX_LENGTH,
                          batch_size=BATCH)
    assert np.array_equal(embedding_matrix(binary.column("embedding")), packed)


def _actor_pids(name: str) -> set[int]:
    """Ray names an actor's process after its class ("ray::MapWorker(MapBatches(X))")."""
    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if cmdline.startswith("ray::") and name in cmdline:
            pids.add(p.info["pid"])
    return pids


def test_killed_actor_is_restarted_and_output_exact(cluster, model, corpus, transformers_dir):
    root, texts = corpus
    ds = ray.data.read_parquet(str(root))
    out = embed_dataset(ds, transformers_dir, text_column="body", task=TASK,
                        max_length=MAX_LENGTH, batch_size=BATCH, batch_rows=8, actors=1)
    parts, killed, restarted = [], None, set()
    deadline = time.monotonic() + WAIT
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        parts.append(batch)
        pids = _actor_pids("RayEmbedder")
        if killed is None:  # the first batch is back: the actor is mid-run
            assert len(pids) == 1, pids
            killed = pids.pop()
            os.kill(killed, 9)
        else:
            restarted |= pids - {killed}
        assert time.monotonic() < deadline, "the Ray run did not finish in time"
    assert killed is not None and restarted, "no actor was restarted after the kill"
    assert sum(len(p) for p in parts) < 2 * len(texts)
    _check(pa.concat_tables(parts), texts, model)


def _cli(*args):
    exe = shutil.which("jina-jax")
    assert exe, "the jina-jax console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=WAIT)


def test_cli_engine_ray_equals_local_job(cluster, model, corpus, transformers_dir, tmp_path):
    root, texts = corpus
    local = tmp_path / "local"
    embed_corpus(model, CorpusJob(inputs=(str(root),), task=TASK, max_length=MAX_LENGTH,
                                  text_field="body", id_field="doc", keep_fields=("year",),
                                  shard_rows=25),
                 str(local), batch_size=BATCH, progress=False, log=None)
    out = tmp_path / "ray"
    args = ["embed", "--model", transformers_dir, "--input", str(root), "--output", f"{out}/",
            "--task", TASK, "--max-length", str(MAX_LENGTH), "--text-field", "body",
            "--id-field", "doc", "--keep-fields", "year", "--shard-rows", "25",
            "--batch-size", str(BATCH), "--quiet"]
    run = _cli(*args, "--engine", "ray", "--ray-address", cluster, "--ray-actors", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "made by ray" in run.stderr
    a, b = open_dataset(str(local), verify=True), open_dataset(str(out), verify=True)
    assert a.table.schema == b.table.schema
    assert a.ids.to_pylist() == b.ids.to_pylist()  # same shards, same order
    assert sorted(a.ids.to_pylist()) == sorted(texts)
    assert a.table.column("year").to_pylist() == b.table.column("year").to_pylist()
    assert np.abs(a.embeddings - b.embeddings).max() < 1e-6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 5  # 25 + 25 + 10, 25 + 11
    assert {s["engine"]["name"] for s in manifest["shards"].values()} == {"ray"}
    assert sorted(os.listdir(out)) == ["manifest.json"] + [f"part-0000{i}.parquet"
                                                           for i in range(5)]
    # the local job takes the Ray-made folder as its own: nothing left to do
    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 shard(s) written, 5 already complete" in again.stderr
    wrong = _cli(*args, "--engine", "ray", "--shard-count", "2", "--shard-index", "0")
    assert wrong.returncode == 2 and "--engine ray" in wrong.stderr


def test_group_shards_streams_a_window_but_feeds_every_actor():
    from jina_jax.data.job import Shard
    from jina_jax.data.ray_data import group_shards

    def shards(*specs):  # (index, rows)
        return [Shard(index=i, input=0, start=0, stop=n) for i, n in specs]

    four = shards((0, 4096), (1, 4096), (2, 4096), (3, 4096), (4, 4096), (5, 100))
    assert group_shards(four, actors=1) == [[0, 1, 2, 3], [4, 5]]  # <= 16,384 rows a task
    assert group_shards(four, actors=2) == [[0, 1, 2], [3, 4, 5]]
    assert group_shards(four, actors=8) == [[0], [1], [2], [3], [4], [5]]
    # a shard bigger than the window is alone; a gap (a shard already done) breaks a run
    assert group_shards(shards((0, 70000), (1, 10), (3, 10)), actors=1) == [[0], [1], [3]]
    assert group_shards([], actors=2) == []
