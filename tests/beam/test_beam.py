"""Embedding in a Beam pipeline (jina_jax.data.beam) on the DirectRunner, in this process: a
Parquet corpus read by Beam's own reader, `RunInference` with `JinaModelHandler`, the rows
written by `WriteEmbeddings`; every row equal to `encode()` of the same model by id (1e-6),
each id exactly once, the model loaded once; the corpus job's schema; bad rows named by id.

Runs only in the Beam virtualenv `.ci/run` builds (Beam pins protobuf and pyarrow below what
`[ray]` brings): `python -m pytest -m beam tests/beam`. No torch: the reference is our own
`encode()` of a random checkpoint with non-zero LoRA B (convert.random_checkpoint).
"""

import os

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pads = pytest.importorskip("pyarrow.dataset")

from apache_beam.metrics.metric import MetricsFilter  # noqa: E402
from apache_beam.ml.inference.base import RunInference  # noqa: E402
from apache_beam.testing.util import assert_that  # noqa: E402

from convert.random_checkpoint import write_random_release  # noqa: E402
from jina_jax import JinaEmbeddingsV3, open_dataset  # noqa: E402
from jina_jax.config import JinaConfig  # noqa: E402
from jina_jax.data.beam import JinaModelHandler, WriteEmbeddings  # noqa: E402
from jina_jax.data.job import CorpusJob, embed_corpus  # noqa: E402
from jina_jax.data.schema import embedding_matrix  # noqa: E402

pytestmark = pytest.mark.beam

TASK = "retrieval.passage"
MAX_LENGTH = 32
BATCH = 8  # encode's batch size everywhere: the runs share their compiled shapes
WORDS = ["alpha", "beta", "gamma", "über", "東京", "delta", "x", "long", "naïve café"]
HIDDEN = 48


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(n)]


def _pipeline():
    # the DirectRunner named: Beam's default (Prism) downloads a binary
    return beam.Pipeline(runner="DirectRunner")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("beam-model") / "tiny")
    cfg = JinaConfig(vocab_size=300, hidden_size=HIDDEN, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=96)
    write_random_release(folder, cfg, seed=3, dtype="float32")
    return folder


@pytest.fixture(scope="module")
def model(checkpoint):
    m = JinaEmbeddingsV3.from_pretrained(checkpoint)
    # non-zero LoRA B: the task's adapter changes the embedding
    a = m.encode(["alpha beta"], task=TASK)
    b = m.encode(["alpha beta"], task=None)
    assert np.abs(a - b).max() > 1e-3
    return m


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two Parquet files of (doc, body, year): the folder and {id: text}."""
    root = tmp_path_factory.mktemp("beam-corpus")
    texts = _texts(90, 0)
    ids = [f"doc-{i}" for i in range(len(texts))]
    for name, part in (("a.parquet", slice(0, 50)), ("b.parquet", slice(50, None))):
        pq.write_table(pa.table({"doc": ids[part], "body": texts[part],
                                 "year": list(range(len(ids[part])))}), root / name,
                       row_group_size=20)
    return root, dict(zip(ids, texts))


def _handler(checkpoint, **kw):
    options = dict(text_field="body", id_field="doc", task=TASK, max_length=MAX_LENGTH,
                   batch_size=BATCH, batch_rows=16, min_batch_rows=1)
    return JinaModelHandler(checkpoint, **{**options, **kw})


def test_parquet_corpus_equals_encode_and_the_corpus_job_schema(checkpoint, model, corpus,
                                                                tmp_path):
    root, texts = corpus
    handler = _handler(checkpoint, keep_fields=("year",))
    out = tmp_path / "embedded"
    p = _pipeline()
    (p | beam.io.ReadFromParquet(str(root / "*.parquet"))
       | beam.Reshuffle()
       | RunInference(handler)
       | WriteEmbeddings(str(out), handler, HIDDEN, kept_types={"year": pa.int64()},
                         rows_per_table=32))
    result = p.run()
    result.wait_until_finish()

    names = sorted(os.listdir(out))
    assert names and all(n.startswith("part-") and n.endswith(".parquet") for n in names), names
    table = pads.dataset(str(out), format="parquet").to_table()
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(texts), "an id is missing or doubled"
    got = embedding_matrix(table.column("embedding"))
    want = model.encode([texts[i] for i in ids], task=TASK, max_length=MAX_LENGTH,
                        batch_size=BATCH)
    assert got.dtype == np.float32 and got.shape == want.shape == (90, HIDDEN)
    assert np.abs(got - want).max() < 1e-6
    years = dict(zip(ids, table.column("year").to_pylist()))
    assert all(years[f"doc-{i}"] == (i if i < 50 else i - 50) for i in range(90))

    # the same columns and types as the corpus job's folder of the same rows
    job = CorpusJob(inputs=(str(root),), task=TASK, text_field="body", id_field="doc",
                    keep_fields=("year",), max_length=MAX_LENGTH)
    embed_corpus(model, job, str(tmp_path / "job"), batch_size=BATCH, progress=False, log=None)
    local = open_dataset(str(tmp_path / "job"))
    # (pyarrow's == ignores the list child's name: compare the text, "element" included)
    assert str(table.schema.remove_metadata()) == str(local.table.schema.remove_metadata())
    assert table.schema.field("embedding").type.value_field.name == "element"

    # one model load for the whole run (one worker in the DirectRunner)
    loads = result.metrics().query(MetricsFilter().with_name("load_model_latency_milli_secs"))
    assert sum(d.committed.count for d in loads["distributions"]) == 1


def test_keyed_pairs_and_task_field(checkpoint, model):
    texts = _texts(40, 1)
    tasks = [(TASK, "retrieval.query", None, "text_matching")[i % 4] for i in range(40)]
    want = model.encode(texts, task=tasks, max_length=MAX_LENGTH, batch_size=BATCH,
                        truncate_dim=32)
    want_by_id = {f"k{i}": want[i] for i in range(40)}

    def check(pairs):
        got = dict(pairs)
        assert len(pairs) == len(got) == 40 and got.keys() == want_by_id.keys()
        worst = max(float(np.abs(got[k] - want_by_id[k]).max()) for k in got)
        assert worst < 1e-6, worst
        assert all(v.shape == (32,) and v.dtype == np.float32 for v in got.values())

    def check_rows(rows):
        assert sorted(r["id"] for r in rows) == sorted(want_by_id)
        assert all(list(r) == ["id", "embedding"] for r in rows)
        check([(r["id"], r["embedding"]) for r in rows])

    with _pipeline() as p:
        rows = p | "Rows" >> beam.Create(
            [{"doc": f"k{i}", "body": t, "task": tasks[i]} for i, t in enumerate(texts)])
        out = rows | "Embed rows" >> RunInference(_handler(checkpoint, task=None,
                                                           task_field="task", truncate_dim=32))
        assert_that(out, check_rows, label="rows")
    one_task = model.encode(texts, task=TASK, max_length=MAX_LENGTH, batch_size=BATCH,
                            truncate_dim=32)
    want_by_id = {f"k{i}": one_task[i] for i in range(40)}
    with _pipeline() as p:
        pairs = p | beam.Create([(f"k{i}", t) for i, t in enumerate(texts)])
        assert_that(pairs | RunInference(_handler(checkpoint, truncate_dim=32)), check)


@pytest.mark.parametrize("row, message", [
    ({"doc": "doc-7", "body": None}, r"'body' \(text_field\), row \d+ of the batch "
                                     r"\(id 'doc-7'\): null, not a string"),
    ({"doc": "doc-7", "text": "x"}, r"id 'doc-7': no field 'body' \(text_field\)"),
    ({"body": "x"}, r"no field 'doc' \(id_field\)"),
    ({"doc": "doc-7", "body": 3}, r"\(id 'doc-7'\): int, not a string"),
])
def test_a_bad_row_is_named(checkpoint, row, message):
    good = [{"doc": f"doc-{i}", "body": t} for i, t in enumerate(_texts(5, 2))]
    with pytest.raises(Exception, match=message):
        with _pipeline() as p:
            _ = p | beam.Create(good + [row]) | RunInference(_handler(checkpoint))


def test_bad_options_are_errors(checkpoint, tmp_path):
    with pytest.raises(Exception, match="unknown task 'retrieval.nope'"):
        with _pipeline() as p:
            _ = (p | beam.Create([{"doc": "a", "body": "x"}])
                 | RunInference(_handler(checkpoint, task="retrieval.nope")))
    with pytest.raises(ValueError, match="min_batch_rows"):
        _handler(checkpoint, batch_rows=4, min_batch_rows=8)
    with pytest.raises(ValueError, match="task or task_field"):
        _handler(checkpoint, task_field="t")
    with pytest.raises(TypeError, match="checkpoint path or hub id"):
        JinaModelHandler(object())
    with pytest.raises(TypeError):
        _handler(checkpoint, windows=3)  # an unknown option
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.parquet").write_bytes(b"")
    with pytest.raises(FileExistsError, match="holds files"):
        WriteEmbeddings(str(tmp_path / "full"), _handler(checkpoint), HIDDEN)
