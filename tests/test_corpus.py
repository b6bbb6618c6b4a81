"""Embedding a corpus into a folder (`jina-jax embed --output FOLDER/`, jina_jax.data): every
input format, ids and kept fields, equal to encode() row for row by id; resume, refusals,
corrupted shards, several processes, CSV headers, empty texts."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from jina_jax import CorpusJob, JinaEmbeddingsV3, embed_corpus, open_dataset  # noqa: E402
from jina_jax.data.schema import embedding_matrix  # noqa: E402

TASK = "retrieval.passage"
DIM = 32
BATCH = 8  # one batch size everywhere: the tests share their compiled shapes
WORDS = ["alpha", "beta", "gamma", "über", "東京", "delta", "x", "long"]


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(n)]


def _run(model, job, out):
    return embed_corpus(model, job, str(out), progress=False, log=None, batch_size=BATCH)


def _cli(*args):
    exe = shutil.which("jina-jax")
    assert exe, "the jina-jax console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def model(transformers_dir):
    return JinaEmbeddingsV3.from_pretrained(transformers_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two Parquet files (string ids, several row groups), a JSONL file and a text file:
    {relative name: [(id, text, year, title)]} and the folder."""
    root = tmp_path_factory.mktemp("corpus")
    files = {}
    texts = _texts(70, 0)
    a, b, c, d = texts[:23], texts[23:40], texts[40:58], texts[58:]
    os.makedirs(root / "pq")
    for name, part, first in (("pq/a.parquet", a, 0), ("pq/b.parquet", b, 23)):
        rows = [(f"doc-{first + i}", t, 1990 + i, f"title {first + i}")
                for i, t in enumerate(part)]
        pq.write_table(pa.table({"doc": [r[0] for r in rows], "body": [r[1] for r in rows],
                                 "year": [r[2] for r in rows], "title": [r[3] for r in rows]}),
                       root / name, row_group_size=6)
        files[name] = rows
    rows = [(f"doc-{40 + i}", t, 2000 + i, f"title {40 + i}") for i, t in enumerate(c)]
    (root / "c.jsonl").write_text("".join(json.dumps(
        {"doc": r[0], "body": r[1], "year": r[2], "title": r[3]}, ensure_ascii=False) + "\n"
        for r in rows), encoding="utf-8")
    files["c.jsonl"] = rows
    (root / "d.txt").write_text("\n".join(d) + "\n", encoding="utf-8")
    files["d.txt"] = [(None, t, None, None) for t in d]
    return root, files


def _by_id(folder):
    ds = open_dataset(str(folder), verify=True)
    ids = ds.ids.to_pylist()
    assert len(set(ids)) == len(ids), "an id appears twice"
    return ds, dict(zip(ids, ds.embeddings))


def test_ids_kept_fields_and_types(model, corpus, tmp_path):
    root, files = corpus
    # Parquet only (a glob): ids and kept fields keep their Parquet types.
    job = CorpusJob(inputs=(str(root / "pq" / "*.parquet"),), task=TASK, truncate_dim=DIM,
                    text_field="body", id_field="doc", keep_fields=("year", "title"),
                    shard_rows=10)
    summary = _run(model, job, str(tmp_path / "pq"))
    assert summary.complete and summary.rows == 40 and summary.shards_written == 5
    ds, got = _by_id(tmp_path / "pq")
    rows = files["pq/a.parquet"] + files["pq/b.parquet"]
    assert ds.table.schema.names == ["id", "year", "title", "embedding"]
    assert ds.table.schema.field("year").type == pa.int64()
    assert ds.ids.to_pylist() == [r[0] for r in rows]
    assert ds.table.column("year").to_pylist() == [r[2] for r in rows]
    assert ds.table.column("title").to_pylist() == [r[3] for r in rows]
    expected = model.encode([r[1] for r in rows], task=TASK, truncate_dim=DIM,
                            batch_size=BATCH)
    np.testing.assert_allclose(np.stack([got[r[0]] for r in rows]), expected, atol=1e-6)
    # JSONL with the Parquet files: kept non-strings become their JSON text.
    both = CorpusJob(inputs=(str(root / "pq"), str(root / "c.jsonl")), task=TASK,
                     truncate_dim=DIM, text_field="body", id_field="doc",
                     keep_fields=("year",), shard_rows=64)
    _run(model, both, str(tmp_path / "both"))
    ds, got = _by_id(tmp_path / "both")
    rows = rows + files["c.jsonl"]
    assert ds.table.schema.field("year").type == pa.string()
    assert ds.table.column("year").to_pylist() == [str(r[2]) for r in rows]
    expected = model.encode([r[1] for r in rows], task=TASK, truncate_dim=DIM,
                            batch_size=BATCH)
    np.testing.assert_allclose(np.stack([got[r[0]] for r in rows]), expected, atol=1e-6)


def test_corpus_equals_encode(model, corpus, tmp_path):
    """Every format of a folder input, default ids "<name>:<row>", equal to encode() by id."""
    root, files = corpus
    out = tmp_path / "out"
    done = _cli("embed", "--model", model.source, "--task", TASK, "--input", str(root),
                "--text-field", "body", "--output", f"{out}/", "--truncate-dim", str(DIM),
                "--shard-rows", "8", "--batch-size", str(BATCH))
    assert done.returncode == 0, done.stderr
    assert "complete: 70 row(s) [70, 32]" in done.stderr and "shape(s)" in done.stderr
    ds, got = _by_id(out)
    expected_ids = [f"{name}:{row}" for name, rows in sorted(files.items())
                    for row in range(1, len(rows) + 1)]
    assert ds.ids.to_pylist() == expected_ids  # input order: files sorted, rows in order
    texts = [t for _, rows in sorted(files.items()) for _, t, _, _ in rows]
    expected = model.encode(texts, task=TASK, truncate_dim=DIM, batch_size=BATCH)
    np.testing.assert_allclose(np.stack([got[i] for i in expected_ids]), expected, atol=1e-6)
    np.testing.assert_allclose(ds.embeddings, expected, atol=1e-6)
    # the documented layout: shards per file of at most 8 rows, the manifest, nothing else
    plan = [(s["input"], s["start"], s["stop"]) for s in ds.manifest.header["plan"]]
    sizes = [len(rows) for _, rows in sorted(files.items())]
    assert plan == [(i, a, min(a + 8, n)) for i, n in enumerate(sizes) for a in range(0, n, 8)]
    names = sorted(os.listdir(out))
    assert names == ["manifest.json"] + [f"part-{i:05d}.parquet" for i in range(len(plan))]
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.names == ["id", "embedding"]
    assert schema.field("id").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.field("element", pa.float32()), DIM)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["header"]["settings"]["task"] == TASK
    assert manifest["header"]["model"]["weights_sha256"]
    assert sum(r["rows"] for r in manifest["shards"].values()) == 70


def test_quantised_column(model, corpus, tmp_path):
    root, files = corpus
    job = CorpusJob(inputs=(str(root / "c.jsonl"),), task=TASK, text_field="body",
                    precision="ubinary")
    _run(model, job, str(tmp_path / "bits"))
    ds = open_dataset(str(tmp_path / "bits"))
    width = -(-model.config.hidden_size // 8)
    assert ds.table.schema.field("embedding").type == pa.list_(
        pa.field("element", pa.uint8()), width)
    np.testing.assert_array_equal(ds.embeddings, model.encode(
        [r[1] for r in files["c.jsonl"]], task=TASK, precision="ubinary", batch_size=BATCH))


def test_resume_corrupt_and_refusals(model, corpus, tmp_path):
    """A rerun skips checked shards and redoes missing or corrupt ones; a rerun with another
    argument or a changed input is refused with one line (exit 2); --overwrite starts over."""
    root, files = corpus
    src = tmp_path / "in"
    shutil.copytree(root, src)
    out = tmp_path / "out"
    job = CorpusJob(inputs=(str(src),), task=TASK, truncate_dim=DIM, text_field="body",
                    shard_rows=8)
    _run(model, job, str(out))
    first, got_first = _by_id(out)
    again = _run(model, job, str(out))
    assert (again.shards_written, again.rows) == (0, 0)
    os.remove(out / "part-00002.parquet")
    with open(out / "part-00004.parquet", "r+b") as f:  # same size, other bytes
        f.seek(40)
        f.write(b"\x00corrupt\x00")
    (out / ".part-00005.parquet.tmp-abc").write_bytes(b"left by a killed run")
    with pytest.raises(ValueError, match="do not match the manifest"):
        open_dataset(str(out), verify=True)
    redone = _run(model, job, str(out))
    assert redone.shards_written == 2 and redone.shards_skipped == len(first.manifest.shards) - 2
    ds, got = _by_id(out)
    assert ds.ids.to_pylist() == first.ids.to_pylist()
    np.testing.assert_allclose(ds.embeddings, first.embeddings, atol=1e-6)
    assert not [n for n in os.listdir(out) if n.startswith(".")]

    args = ["embed", "--model", model.source, "--task", TASK, "--input", str(src),
            "--text-field", "body", "--output", f"{out}/", "--truncate-dim", str(DIM),
            "--shard-rows", "8", "--batch-size", str(BATCH)]
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    changed = _cli(*args, "--max-length", "20")
    assert changed.returncode == 2, changed.stderr
    assert changed.stderr.strip().splitlines() == [
        f"error: --output {out} holds a dataset made differently: --max-length differs (was "
        "38, now 20); add --overwrite to start over"]
    with open(src / "c.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"doc": "new", "body": "a new row"}) + "\n")
    grown = _cli(*args)
    assert grown.returncode == 2 and len(grown.stderr.strip().splitlines()) == 1
    assert f"input {src / 'c.jsonl'} changed (size" in grown.stderr
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # nothing touched
    fresh = _cli(*args, "--overwrite", "--quiet")
    assert fresh.returncode == 0, fresh.stderr
    assert "complete: 71 row(s)" in fresh.stderr and "0 already complete" in fresh.stderr


def test_two_processes_equal_one(model, corpus, tmp_path):
    """--shard-index 0/1 --shard-count 2, run at the same time into one folder, give the
    one-process dataset; their manifests end merged into manifest.json."""
    root, _ = corpus
    one = tmp_path / "one"
    job = CorpusJob(inputs=(str(root),), task=TASK, truncate_dim=DIM, text_field="body",
                    shard_rows=8)
    _run(model, job, str(one))
    two = tmp_path / "two"
    cmd = [shutil.which("jina-jax"), "embed", "--model", model.source, "--task", TASK,
           "--input", str(root), "--text-field", "body", "--output", f"{two}/",
           "--truncate-dim", str(DIM), "--shard-rows", "8", "--shard-count", "2"]
    procs = [subprocess.Popen(cmd + ["--shard-index", str(i)], stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert any("complete: 70 row(s)" in e for e in errs), errs
    assert "(process 1 of 2)" in errs[1]
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # merged, nothing left over
    a, b = open_dataset(str(one), verify=True), open_dataset(str(two), verify=True)
    assert a.ids.to_pylist() == b.ids.to_pylist()
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)
    assert a.manifest.header == b.manifest.header


def test_csv_header(model, tmp_path):
    """A .csv input is read with its header, for .npy outputs and folders alike; quoted fields
    may hold newlines and commas."""
    texts = ["first, with a comma", "second\nover two lines", "third \"quoted\""]
    src = tmp_path / "in.csv"
    src.write_text("id,text\n" + "".join(
        f'{i},"{t.replace(chr(34), chr(34) * 2)}"\n' for i, t in enumerate(texts)))
    expected = model.encode(texts, task=TASK, truncate_dim=DIM, batch_size=BATCH)
    done = _cli("embed", "--model", model.source, "--task", TASK, "--input", str(src),
                "--output", str(tmp_path / "e.npy"), "--truncate-dim", str(DIM),
                "--batch-size", str(BATCH))
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, atol=1e-6)
    job = CorpusJob(inputs=(str(src),), task=TASK, truncate_dim=DIM, id_field="id",
                    shard_rows=2)
    _run(model, job, str(tmp_path / "ds"))
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.ids.to_pylist() == ["0", "1", "2"]
    np.testing.assert_allclose(ds.embeddings, expected, atol=1e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n0,fine\n1,two,many\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: 3 field\(s\), the header has 2"):
        embed_corpus(model, CorpusJob(inputs=(str(bad),), task=TASK), str(tmp_path / "b"),
                     progress=False, log=None, batch_size=BATCH)


def test_empty_texts(model, tmp_path):
    """A null or blank text stops the job naming file:row, unless skip_empty: then it is left
    out and counted (summary and manifest); errors name fields and rows."""
    src = tmp_path / "in"
    os.makedirs(src)
    pq.write_table(pa.table({"text": ["one", None, "three", "  "]}), src / "a.parquet")
    (src / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    job = CorpusJob(inputs=(str(src),), task=TASK, shard_rows=2)
    with pytest.raises(ValueError, match=r"^a.parquet:2: null text \('text'\); --skip-empty"):
        _run(model, job, str(tmp_path / "out"))
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]
    job = CorpusJob(inputs=(str(src),), task=TASK, shard_rows=2, skip_empty=True)
    summary = _run(model, job, str(tmp_path / "skip"))
    assert (summary.rows, summary.skipped_empty) == (4, 3)
    assert "3 empty text(s) skipped" in summary.line()
    ds = open_dataset(str(tmp_path / "skip"))
    assert ds.ids.to_pylist() == ["a.parquet:1", "a.parquet:3", "b.jsonl:1", "b.jsonl:3"]
    assert sum(r["skipped_empty"] for r in ds.manifest.shards.values()) == 3
    expected = model.encode(["one", "three", "x", "y"], task=TASK, batch_size=BATCH)
    np.testing.assert_allclose(ds.embeddings, expected, atol=1e-6)
    (src / "c.jsonl").write_text('{"text": "x", "id": 1}\n{"text": "y"}\n{"txt": "z"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: no field 'id'"):
        _run(model, CorpusJob(inputs=(str(src / "c.jsonl"),), id_field="id"), tmp_path / "c")
    with pytest.raises(ValueError, match=r"c.jsonl:3: no field 'text'"):  # not an empty text
        _run(model, CorpusJob(inputs=(str(src / "c.jsonl"),), skip_empty=True), tmp_path / "c2")
    (src / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not UTF-8"):
        embed_corpus(model, CorpusJob(inputs=(str(src / "d.jsonl"),)), str(tmp_path / "d"),
                     progress=False, log=None, batch_size=BATCH)
    with pytest.raises(ValueError, match=r"no column 'body'"):
        embed_corpus(model, CorpusJob(inputs=(str(src / "a.parquet"),), text_field="body"),
                     str(tmp_path / "e"), progress=False, log=None, batch_size=BATCH)


def test_cli_checks(model, corpus, tmp_path):
    """Dataset flags need a folder output; Parquet needs one too; foreign files are refused."""
    root, _ = corpus
    base = ["embed", "--model", model.source, "--task", TASK]
    flag = _cli(*base, "--input", str(root / "d.txt"), "--output", str(tmp_path / "o.npy"),
                "--id-field", "doc")
    assert flag.returncode == 2 and "--id-field needs a dataset --output" in flag.stderr
    parquet = _cli(*base, "--input", str(root / "pq" / "a.parquet"), "--output",
                   str(tmp_path / "o.npy"))
    assert parquet.returncode == 2 and "need a dataset --output" in parquet.stderr
    os.makedirs(tmp_path / "mixed")
    (tmp_path / "mixed" / "notes.txt").write_text("mine")
    foreign = _cli(*base, "--input", str(root / "d.txt"), "--output", f"{tmp_path / 'mixed'}/")
    assert foreign.returncode == 2 and "did not write (notes.txt)" in foreign.stderr
    assert os.listdir(tmp_path / "mixed") == ["notes.txt"]


def test_schema_builder_shares_memory():
    """The embedding column is built from numpy without Python lists, and read back without a
    copy."""
    from jina_jax.data.schema import embedding_column

    array = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    column = embedding_column(array)
    back = embedding_matrix(column)
    assert np.shares_memory(back, array) and np.array_equal(back, array)
    assert column.type == pa.list_(pa.field("element", pa.float32()), 7)


def test_lone_surrogates_in_carried_fields(model, tmp_path):
    """An id or kept value with a lone surrogate (from a JSON escape) cannot be carried as given
    into a UTF-8 column: refused naming file, row and field; in the text it is embedded as the
    tokenizer sees it (U+FFFD), as encode() does."""
    src = tmp_path / "s.jsonl"
    src.write_text('{"id": "a", "text": "x \\ud800 y", "k": "ok"}\n'
                   '{"id": "b\\udfff", "text": "z", "k": "ok"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"^s.jsonl:2: field 'id' \(--id-field\) holds a lone "
                                         r"UTF-16 surrogate '\\udfff' at character 1"):
        _run(model, CorpusJob(inputs=(str(src),), task=TASK, id_field="id"), tmp_path / "o1")
    src.write_text('{"id": "a", "text": "x \\ud800 y", "k": {"n": ["\\ud800"]}}\n',
                   encoding="utf-8")
    with pytest.raises(ValueError, match=r"^s.jsonl:1: field 'k' \(--keep-fields\) holds a lone"):
        _run(model, CorpusJob(inputs=(str(src),), task=TASK, keep_fields=("k",)), tmp_path / "o2")
    src.write_text('{"id": "a", "text": "x \\ud800 y", "k": "ok"}\n', encoding="utf-8")
    _run(model, CorpusJob(inputs=(str(src),), task=TASK, id_field="id", keep_fields=("k",)),
         tmp_path / "o3")
    ds = open_dataset(str(tmp_path / "o3"))
    assert ds.ids.to_pylist() == ["a"] and ds.table.column("k").to_pylist() == ["ok"]
    expected = model.encode(["x \ud800 y"], task=TASK, batch_size=BATCH)
    np.testing.assert_allclose(ds.embeddings, expected, atol=1e-6)


def test_corpus_of_no_rows(model, corpus, tmp_path):
    """Inputs with no rows make a complete folder that reads back as zero rows with the
    columns and types a non-empty one has."""
    root, _ = corpus
    os.makedirs(tmp_path / "in")
    empty = tmp_path / "in" / "a.parquet"
    pq.write_table(pq.read_table(root / "pq" / "a.parquet").slice(0, 0), empty)
    job = CorpusJob(inputs=(str(empty),), task=TASK, text_field="body", id_field="doc",
                    keep_fields=("year",), precision="ubinary")
    summary = _run(model, job, tmp_path / "out")
    assert summary.rows == 0
    ds = open_dataset(str(tmp_path / "out"), verify=True)
    full = CorpusJob(inputs=(str(root / "pq" / "a.parquet"),), task=TASK, text_field="body",
                     id_field="doc", keep_fields=("year",), precision="ubinary")
    _run(model, full, tmp_path / "full")
    assert len(ds) == 0 and ds.table.schema == open_dataset(str(tmp_path / "full")).table.schema
    assert ds.embeddings.shape == (0, -(-model.config.hidden_size // 8))
