"""Writers under interruption: a child process is stopped (SIGINT or SIGKILL) at seeded random
moments while it writes, and the target must be its complete old content or its complete new
content, never a mixture or a partial file. Bounded: a few trials per writer."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

EXE = shutil.which("jina-jax")
SAVE = ("from jina_jax import JinaEmbeddingsV3; import sys; "
        "m = JinaEmbeddingsV3.from_pretrained(sys.argv[1]); "
        "[m.save_pretrained(sys.argv[2], format=sys.argv[3]) for _ in range(int(sys.argv[4]))]")


def snapshot(path) -> dict:
    """{relative path: sha256} of a file or of every file under a folder."""
    path = str(path)
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def run_to_end(cmd) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - start


def interrupt(cmd, delay: float, sig) -> subprocess.CompletedProcess:
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    child.send_signal(sig)
    out, err = child.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def check_trials(make_old, cmd, target, new, duration, seed, trials=3, cli=True):
    """Stops `cmd` at random moments over its run; after each, `target` is old or new whole.
    cli: `cmd` is our command line, whose Ctrl-C must end in one line and exit 130."""
    rng = np.random.default_rng(seed)
    for trial in range(trials):
        make_old()
        old = snapshot(target)
        assert old != new
        sig = signal.SIGKILL if trial == trials - 1 else signal.SIGINT
        result = interrupt(cmd, float(rng.uniform(0.3, 1.0)) * duration, sig)
        after = snapshot(target)
        assert after in (old, new), (trial, sig, result.stderr[-2000:], sorted(
            k for k in set(after) | set(new) if after.get(k) != new.get(k)))
        if cli and sig == signal.SIGINT and result.returncode != 0:
            assert result.returncode == 130, result.stderr[-2000:]
            assert "interrupted" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "lines.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "über", "東京", "x"]
    path.write_text("\n".join(" ".join(rng.choice(words, size=rng.integers(1, 9)))
                              for _ in range(4000)) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_embed_interrupted(transformers_dir, lines, tmp_path, suffix):
    target = tmp_path / f"out{suffix}"
    cmd = [EXE, "embed", "--model", transformers_dir, "--task", "separation", "--input", lines,
           "--output", str(target), "--overwrite", "--batch-size", "8"]
    duration = run_to_end(cmd)
    new = snapshot(target)
    check_trials(lambda: target.write_bytes(b"old content, not an embedding file\n"), cmd,
                 target, new, duration, seed=1)


def test_convert_interrupted(original_bf16, tmp_path):
    target = tmp_path / "converted"
    cmd = [EXE, "convert", original_bf16[0], str(target), "--overwrite"]
    duration = run_to_end(cmd)
    new = snapshot(target)

    def make_old():
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        (target / "config.json").write_text('{"old": true}')
        (target / "params.safetensors").write_bytes(b"old")
    check_trials(make_old, cmd, target, new, duration, seed=2)
    # The writer itself, many times in one process so that most stops land inside a write.
    loop = [sys.executable, "-c", "import sys; from convert.formats import load, save_native; "
            "ckpt = load(sys.argv[1]); [save_native(sys.argv[2], ckpt) for _ in range(8)]",
            original_bf16[0], str(target)]
    check_trials(make_old, loop, target, new, run_to_end(loop), seed=5, cli=False)


@pytest.mark.parametrize("fmt", ["jina_jax", "transformers", "original"])
def test_save_pretrained_interrupted(transformers_dir, tmp_path, fmt):
    target = tmp_path / "saved"
    cmd = [sys.executable, "-c", SAVE, transformers_dir, str(target), fmt, "8"]
    duration = run_to_end(cmd)
    new = snapshot(target)

    def make_old():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(transformers_dir, target)  # a different checkpoint lives there
    check_trials(make_old, cmd, target, new, duration, seed=3, cli=False)


def test_finetune_save_state_interrupted(transformers_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"query": "q{i} alpha", "positive": "p{i} beta gamma"}}\n'
                             for i in range(16)))
    target = tmp_path / "tuned"
    cmd = [EXE, "finetune", "--model", transformers_dir, "--data", str(pairs), "--output",
           str(target), "--steps", "3", "--batch-size", "4", "--max-length", "16",
           "--save-state", "--overwrite"]
    duration = run_to_end(cmd)
    new = snapshot(target)
    assert "train_state.safetensors" in new

    def make_old():
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        (target / "train_state.safetensors").write_bytes(b"old state")
    check_trials(make_old, cmd, target, new, duration, seed=4, trials=2)
