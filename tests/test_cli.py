"""`jina-jax embed`: both input formats, both output formats, equal to encode(), clear errors."""

import json
import shutil
import subprocess

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
