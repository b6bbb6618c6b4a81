"""The server's warm-up (issue 21, part 4): shapes readied by a thread pool, each once however
many threads ask; until warm-up is done a batch runs in a ready shape that holds it instead of
compiling its own; a restart loads every shape from the executable store (live server)."""

import re
import threading
import time

import numpy as np
import pytest

from jina_jax import JinaEmbeddingsV3
from jina_jax.batcher import Batcher
from jina_jax.cost import CostModel
from jina_jax.encode import FILLER, Batch
from jina_jax.tokenize import pad

pytest.importorskip("starlette", reason="the [serve] extra is not installed")

from tests.test_serve import Server, sample_text  # noqa: E402


@pytest.fixture(scope="module")
def model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


def test_threads_ready_each_shape_once(model):
    """Two warm-up threads ready every shape once (compile count = shapes), and two threads
    asking for the same new shape at once make it ready once: the second waits for the first."""
    fresh = JinaEmbeddingsV3.from_pretrained(model.source)
    batcher = Batcher(fresh, max_batch_tokens=256, max_batch_size=8, max_length=24)
    total = len(batcher.shapes()) + len(batcher.late_shapes())
    assert batcher.warm_up(threads=2) == total == fresh.compile_count
    assert batcher.ready == set(batcher.shapes())

    ids, lengths = pad([FILLER] * 3, 40, fresh.config.pad_token_id)  # a shape not in the set
    start, before, results = threading.Barrier(2), fresh.compile_count, []

    def ask():
        start.wait(30)
        results.append(
            fresh.prepare_pooled(ids, lengths, [None] * 3, merge=False, adapters=batcher.adapters)
        )

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [True, True]
    assert fresh.compile_count == before + 1


def test_unready_shape_runs_in_a_ready_one(model):
    """With only some shapes ready, a round of two short texts (its own shape (2, 16), not
    ready) runs in the ready (4, 24): nothing compiles, each answer equals encode() alone."""
    fresh = JinaEmbeddingsV3.from_pretrained(model.source)
    batcher = Batcher(fresh, max_batch_tokens=256, max_batch_size=8, max_wait_ms=50,
                      max_length=24)
    batcher.warm_up(shapes=[(1, 16), (4, 24)], late=False)
    assert batcher.ready == {(1, 16), (4, 24)}
    own = Batch(("retrieval.query", None), 16, 2, (0, 1))
    assert batcher.covered(own) == Batch(("retrieval.query", None, None, None), 24, 4, (0, 1))
    assert batcher.covered(Batch((None,), 16, 1, (0,))) == Batch((None,), 16, 1, (0,))
    assert batcher.covered(Batch((None,) * 8, 16, 8, tuple(range(8)))).rows == 8  # no cover

    texts, tasks = [sample_text(1), sample_text(2)], ["retrieval.query", None]
    jobs = [batcher.submit([t], [fresh.resolve_task(k) if k else None], 32)
            for t, k in zip(texts, tasks)]
    compiled = fresh.compile_count
    batcher.start()
    try:
        for job, text, task in zip(jobs, texts, tasks):
            embedding, _ = job.future.result(120)
            np.testing.assert_allclose(
                embedding[0], model.encode(text, task=task, max_length=24, truncate_dim=32),
                atol=1e-5)
    finally:
        batcher.close(30)
    assert fresh.compile_count == compiled
    assert batcher.batches_total.value() == 1 and (2, 16) not in batcher.ready


def test_warmed_plan_prices_no_compile(model):
    """The plan prices a compile only for shapes not ready: cold, two widths share one wide
    batch (a second shape would cost a compile); warmed, each width gets its own, as the cost
    of running them says (the 48-request burst ran in one (64, 64) batch before this)."""
    batcher = Batcher(JinaEmbeddingsV3.from_pretrained(model.source), max_batch_tokens=256,
                      max_batch_size=8, max_length=24)
    batcher.runner.cost = CostModel(call_s=1e-3, token_s=1e-3, key_s=0.0, min_tokens=1,
                                    shape_s=10.0)
    ids = [np.ones(n, np.int32) for n in (24, 24, 10, 10, 10, 10)]  # widths 24 and 16
    shapes = [(b.rows, b.width) for b in batcher.runner.plan(ids, [None] * 6)]
    assert shapes == [(8, 24)]
    batcher.warm_up(late=False)
    shapes = [(b.rows, b.width) for b in batcher.runner.plan(ids, [None] * 6)]
    assert shapes == [(2, 24), (4, 16)]


@pytest.mark.slow
def test_restart_loads_every_shape_from_the_store(transformers_dir, tmp_path, monkeypatch):
    """A live server on an empty cache compiles its shapes; started again, it loads them all
    from the executable store and says so, and compiles nothing while answering."""
    monkeypatch.setenv("JINA_JAX_COMPILATION_CACHE", str(tmp_path / "xla"))
    flags = ("--max-length", "24", "--max-batch-tokens", "128", "--max-batch-size", "8",
             "--log-level", "info")
    first = Server(transformers_dir, *flags)
    assert first.stop() == 0
    log = "".join(first.log)
    ready = re.search(r"ready: (\d+) shapes in [\d.]+ s \((\d+) compiled, 0 loaded", log)
    assert ready and ready.group(1) == ready.group(2), log

    again = Server(transformers_dir, *flags)
    try:
        status, body = again.post({"input": ["a restarted server"]})
        assert status == 200, body
        compiles = again.metrics()["jina_jax_compiles"]
    finally:
        assert again.stop() == 0
    deadline = time.monotonic() + 10  # the log's reader thread reaches the end of stderr
    while "background warm-up" not in "".join(again.log) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = "".join(again.log)
    ready = re.search(r"ready: (\d+) shapes in [\d.]+ s \(0 compiled, (\d+) loaded from the "
                      r"store", log)
    assert ready and ready.group(1) == ready.group(2), log
    background = re.search(r"background warm-up: (\d+) shapes in [\d.]+ s \(0 compiled, "
                           r"(\d+) loaded from the store", log)
    assert background and background.group(1) == background.group(2), log
    assert compiles == int(ready.group(1)) + int(background.group(1))
