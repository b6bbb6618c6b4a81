"""`jina-jax embed`: both input formats, both output formats, equal to encode(), clear errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jina_jax import JinaEmbeddingsV3

TEXTS = ["first text", "", "zweiter Text — ü", "third one, a bit longer than the others"]


def _cli(*args, stdin=None, env=None):
    exe = shutil.which("jina-jax")
    assert exe, "the jina-jax console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def expected(transformers_dir):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    return model.encode(TEXTS, task="retrieval.passage", truncate_dim=32)


def test_lines_to_npy(transformers_dir, tmp_path, expected):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    out = _cli("embed", "--model", transformers_dir, "--task", "retrieval_passage",
               "--input", str(src), "--output", str(tmp_path / "e.npy"), "--truncate-dim", "32")
    assert out.returncode == 0, out.stderr
    got = np.load(tmp_path / "e.npy")
    # The blank line is skipped (the input rule of every format), and said so.
    assert got.dtype == np.float32 and got.shape == (3, 32)
    np.testing.assert_allclose(got, expected[[0, 2, 3]], atol=1e-6)
    assert "1 blank line(s) skipped" in out.stderr


def test_jsonl_to_jsonl_keeps_fields(transformers_dir, tmp_path, expected):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = _cli("embed", "--model", transformers_dir, "--task", "retrieval.passage", "--input",
               str(src), "--text-field", "body", "--output", str(tmp_path / "o.jsonl"),
               "--truncate-dim", "32")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2, 3] and records[2]["body"] == TEXTS[2]
    np.testing.assert_allclose(np.array([r["embedding"] for r in records]), expected, atol=1e-6)


def test_stdin_to_stdout(transformers_dir, expected):
    out = _cli("embed", "--model", transformers_dir, "--task", "retrieval.passage",
               "--truncate-dim", "32", stdin="\n".join(TEXTS))
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["text"] for r in records] == [t for t in TEXTS if t]
    np.testing.assert_allclose(np.array([r["embedding"] for r in records]),
                               expected[[0, 2, 3]], atol=1e-6)
    assert "embedded 3 text(s)" in out.stderr


def test_second_process_compiles_nothing(transformers_dir, tmp_path, expected):
    """With a cache folder, a second `embed` process loads every shape the first compiled;
    with the cache off, nothing is written and every process compiles."""
    import os
    import re

    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS * 5) + "\n")

    def run(name, cache):
        env = dict(os.environ, JINA_JAX_COMPILATION_CACHE=cache)
        out = _cli("embed", "--model", transformers_dir, "--task", "retrieval.passage",
                   "--input", str(src), "--output", str(tmp_path / name), "--truncate-dim", "32",
                   "--batch-size", "2", env=env)
        assert out.returncode == 0, out.stderr
        found = re.search(r"; (\d+) shape\(s\), (\d+) from the compilation cache", out.stderr)
        assert found, out.stderr
        np.testing.assert_allclose(np.load(tmp_path / name), np.tile(expected[[0, 2, 3]], (5, 1)),
                                   atol=1e-6)
        return int(found[1]), int(found[2])

    cache = tmp_path / "xla"
    shapes, loaded = run("a.npy", str(cache))
    assert shapes >= 2 and loaded == 0
    assert run("b.npy", str(cache)) == (shapes, shapes)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert run("c.npy", "0") == (shapes, 0) and run("d.npy", "off") == (shapes, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy", "c.npy", "d.npy",
                                                          "in.txt", "xla"]


def test_errors(transformers_dir, tmp_path):
    missing = _cli("embed", "--model", str(tmp_path / "nope"), "--task", "separation", stdin="x")
    assert missing.returncode == 1 and "no such folder" in missing.stderr
    task = _cli("embed", "--model", transformers_dir, "--task", "summarize", stdin="x")
    assert task.returncode == 2 and "--task: unknown task 'summarize'" in task.stderr
    unreadable = _cli("embed", "--model", transformers_dir, "--task", "none", "--input",
                      str(tmp_path / "absent.txt"))
    assert unreadable.returncode == 2 and "absent.txt: no such file" in unreadable.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    malformed = _cli("embed", "--model", transformers_dir, "--task", "none", "--input", str(bad))
    assert malformed.returncode == 1 and "bad.jsonl:2: not valid JSON" in malformed.stderr
    ext = _cli("embed", "--model", transformers_dir, "--task", "none", "--output",
               str(tmp_path / "o.csv"), stdin="x")
    assert ext.returncode == 2 and "must end in .npy or .jsonl" in ext.stderr


def test_query_document_precision_and_late_chunking(transformers_dir, tmp_path):
    model = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    src = tmp_path / "in.txt"
    src.write_text("Hi there. Yes!\nsecond text. more\n")
    out = _cli("embed", "--model", transformers_dir, "--query", "--input", str(src),
               "--output", str(tmp_path / "q.npy"))
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"),
                               model.encode_query(["Hi there. Yes!", "second text. more"]),
                               atol=1e-6)
    out = _cli("embed", "--model", transformers_dir, "--document", "--input", str(src),
               "--output", str(tmp_path / "b.npy"), "--precision", "ubinary")
    assert out.returncode == 0, out.stderr
    got = np.load(tmp_path / "b.npy")
    assert got.dtype == np.uint8 and got.shape == (2, 6)
    np.testing.assert_array_equal(got, model.encode_document(
        ["Hi there. Yes!", "second text. more"], precision="ubinary"))
    chunks = _cli("embed", "--model", transformers_dir, "--document", "--input", str(src),
                  "--late-chunking", "--max-length", "38")
    assert chunks.returncode == 0, chunks.stderr
    records = [json.loads(line) for line in chunks.stdout.splitlines()]
    expected = model.encode_late_chunks(["Hi there. Yes!", "second text. more"], max_length=38)
    assert [(r["doc"], r["chunk"], r["start"], r["end"]) for r in records] == [
        (d, j, a, b) for d, (_, spans) in enumerate(expected) for j, (a, b) in enumerate(spans)]
    np.testing.assert_allclose(np.array([r["embedding"] for r in records]),
                               np.concatenate([e for e, _ in expected]), atol=1e-6)
    int8 = _cli("embed", "--model", transformers_dir, "--document", "--input", str(src),
                "--precision", "int8")
    assert int8.returncode == 2 and "needs --ranges" in int8.stderr


def test_no_traceback_for_expected_stops(transformers_dir, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i}\n" for i in range(300)))
    # The output file exists: refused before any work; --overwrite replaces it.
    (tmp_path / "o.npy").write_bytes(b"keep me")
    again = _cli("embed", "--model", transformers_dir, "--task", "none", "--input", str(src),
                 "--output", str(tmp_path / "o.npy"))
    assert again.returncode == 2 and "already exists (add --overwrite" in again.stderr
    assert (tmp_path / "o.npy").read_bytes() == b"keep me"
    same = _cli("embed", "--model", transformers_dir, "--task", "none", "--input", str(src),
                "--output", str(src), "--overwrite")
    assert same.returncode == 2 and "--output" in same.stderr
    # A reader that goes away: exit 141, nothing on stderr.
    exe = shutil.which("jina-jax")
    pipe = subprocess.run(f"'{exe}' embed --model '{transformers_dir}' --task none --input "
                          f"'{src}' | head -c 10 > /dev/null; echo ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert pipe.stdout.strip() == "141", pipe.stderr
    assert "Traceback" not in pipe.stderr and "Error" not in pipe.stderr
    bad_layers = _cli("random-checkpoint", str(tmp_path / "r"), "--layers", "0")
    assert bad_layers.returncode == 2 and "argument --layers: must be a positive integer" in \
        bad_layers.stderr
    assert not (tmp_path / "r").exists()


def test_help_imports_nothing_heavy():
    """`--help` (every subcommand's) loads no JAX, Flax, torch or tokenizers: what made it take
    5 s once. Its time is measured in the README, not asserted here."""
    code = ("import sys\nfrom jina_jax.cli import main\ntry:\n    main(sys.argv[1:] + ['--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('jax', 'flax', 'torch', "
            "'tokenizers', 'optax') if m in sys.modules))")
    for args in ([], ["embed"], ["convert"], ["finetune"], ["random-checkpoint"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert out.returncode == 0 and "usage" in out.stdout, out.stderr
        assert out.stdout.strip().splitlines()[-1] == "[]", (args, out.stdout[-300:])
    mod = subprocess.run([sys.executable, "-m", "convert", "--help"], capture_output=True,
                         text=True)
    assert mod.stdout.startswith("usage: python -m convert")
