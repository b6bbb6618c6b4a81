"""A corpus job killed (SIGKILL) at seeded random moments while it writes shards and rewrites
its manifest, again and again, then run to the end: the folder equals an uninterrupted run's
(the same ids, each once, embeddings within 1e-6) and no temporary file remains."""

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from jina_jax import open_dataset  # noqa: E402

KILLS = 6
WORDS = ["alpha", "beta", "gamma", "über", "東京", "x"]


def _manifest_mtime(folder) -> int | None:
    try:
        return os.stat(os.path.join(folder, "manifest.json")).st_mtime_ns
    except FileNotFoundError:
        return None


def _start_writing(cmd, folder):
    """Starts `cmd`; returns it once it has written its first shard (its manifest's second
    write: the first is the plan, before any shard), or has ended."""
    child = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    seen, writes = _manifest_mtime(folder), 0
    while writes < 2 and child.poll() is None:
        now = _manifest_mtime(folder)
        if now != seen:
            seen, writes = now, writes + 1
        time.sleep(0.001)
    return child


def test_killed_many_times_then_finished(tmp_path, transformers_dir):
    rng = np.random.default_rng(7)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(240)]
    src = tmp_path / "in"
    os.makedirs(src)
    pq.write_table(pa.table({"doc": [f"d{i}" for i in range(160)], "text": texts[:160]}),
                   src / "a.parquet", row_group_size=16)
    (src / "b.txt").write_text("\n".join(texts[160:]) + "\n", encoding="utf-8")

    def command(out):
        return [shutil.which("jina-jax"), "embed", "--model", transformers_dir, "--task",
                "separation", "--input", str(src), "--output", f"{out}/", "--truncate-dim",
                "32", "--shard-rows", "3", "--batch-size", "8", "--quiet"]
    # The uninterrupted run, timed from its first shard to its end: the writing phase, 80
    # shards each followed by a manifest rewrite.
    reference = tmp_path / "reference"
    child = _start_writing(command(reference), reference)
    began = time.perf_counter()
    assert child.wait(timeout=300) == 0, child.stderr.read()
    writing = time.perf_counter() - began

    out = tmp_path / "out"
    kills, moments, temporaries = 0, [], 0
    for _ in range(4 * KILLS):
        if kills == KILLS:
            break
        child = _start_writing(command(out), out)
        delay = float(rng.uniform(0.0, writing / (KILLS + 2)))
        time.sleep(delay)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            kills += 1
            moments.append(round(delay, 3))
        child.communicate(timeout=300)
        if child.returncode == 0:
            break  # finished before the kill: nothing left to interrupt
        assert child.returncode == -signal.SIGKILL, child.stderr.read()
        temporaries += any(n.startswith(".") for n in os.listdir(out))
    assert kills >= 5, (kills, moments, writing)
    # Kills inside a write leave its temporary file (a shard's or the manifest's): some must.
    assert temporaries >= 1, (moments, writing)
    done = subprocess.run(command(out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "complete: 240 row(s)" in done.stderr

    assert not [n for n in os.listdir(out) if n.startswith(".")], os.listdir(out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    got, want = open_dataset(str(out), verify=True), open_dataset(str(reference), verify=True)
    ids = got.ids.to_pylist()
    assert ids == want.ids.to_pylist() and len(set(ids)) == 240
    np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-6)
    assert [r["rows"] for _, r in sorted(got.manifest.shards.items())] == \
        [r["rows"] for _, r in sorted(want.manifest.shards.items())]
    print(f"{kills} kills at {moments} s into {writing:.2f} s of writing; {temporaries} left a "
          "temporary file")
