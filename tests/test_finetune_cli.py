"""`jina-jax finetune`: a real run end to end, and every bad input named."""

import json
import os

import numpy as np
import pytest

from jina_jax import JinaEmbeddingsV3
from tests.test_cli import _cli
from tests.test_training import synthetic_pairs


@pytest.fixture(scope="module")
def pairs_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    pairs = synthetic_pairs(48)
    train, held_out = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps({"query": q, "positive": p, "negative": pairs[i - 1][1]})
                             + "\n" for i, (q, p) in enumerate(pairs[:32])))
    held_out.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n"
                                for q, p in pairs[32:]))
    return str(train), str(held_out)


def test_finetune_writes_a_loadable_checkpoint(transformers_dir, pairs_files, tmp_path):
    train, held_out = pairs_files
    out = tmp_path / "tuned"
    run = _cli("finetune", "--model", transformers_dir, "--data", train, "--eval-data", held_out,
               "--output", str(out), "--steps", "6", "--batch-size", "8", "--lr", "3e-3",
               "--max-length", "16", "--log-every", "3", "--save-state")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 3: loss" in run.stderr and "step 6: loss" in run.stderr
    assert "step 0: recall@1" in run.stderr and "step 6: recall@1" in run.stderr
    assert os.path.isfile(out / "train_state.safetensors")
    before = JinaEmbeddingsV3.from_pretrained(transformers_dir)
    after = JinaEmbeddingsV3.from_pretrained(str(out))
    assert after.tasks == before.tasks
    for task in after.tasks:
        changed = any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
            _leaves(before.adapters[task]), _leaves(after.adapters[task])))
        assert changed == (task in ("retrieval.query", "retrieval.passage")), task
    for x, y in zip(_leaves(before.params), _leaves(after.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_finetune_new_adapter_in_transformers_format(transformers_dir, pairs_files, tmp_path):
    out = tmp_path / "new"
    run = _cli("finetune", "--model", transformers_dir, "--data", pairs_files[0], "--output",
               str(out), "--adapter", "legal", "--rank", "2", "--steps", "2", "--batch-size",
               "4", "--max-length", "16", "--format", "transformers")
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.path.isfile(out / "legal" / "adapter_config.json")
    assert "legal" in JinaEmbeddingsV3.from_pretrained(str(out)).tasks


def _leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("args, message", [
    (["--adapter", "nope"], "unknown adapter 'nope'"),
    (["--adapter", "nope", "--rank", "0"], "argument --rank: must be a positive integer"),
    (["--steps", "-1"], "argument --steps: must be a positive integer"),
    (["--lr", "0"], "argument --lr: must be a positive number"),
    (["--adapter", "separation", "--rank", "2"], "already exists"),
    (["--batch-size", "400"], "larger than the 32 training pairs"),
    (["--output", "/no/such/parent/out"], "the folder /no/such/parent does not exist"),
    (["--data", "/no/such/pairs.jsonl"], "--data /no/such/pairs.jsonl: no such file"),
])
def test_finetune_bad_arguments(transformers_dir, pairs_files, tmp_path, args, message):
    base = ["finetune", "--model", transformers_dir, "--data", pairs_files[0],
            "--output", str(tmp_path / "o"), "--steps", "1", "--batch-size", "4"]
    run = _cli(*base, *args)
    # A wrong command line exits 2 before any work, with one line naming the flag.
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "o")


def test_finetune_malformed_jsonl_names_the_line(transformers_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "a", "positive": "m"}\n\n{"query": "b", "positive": 3}\n')
    run = _cli("finetune", "--model", transformers_dir, "--data", str(data), "--output",
               str(tmp_path / "o"))
    assert run.returncode == 1 and f"{data}:3: 'positive' must be a string" in run.stderr
    data.write_text('{"query": "a", "positive": "m"}\n{"query": "b", "positive": \n')
    run = _cli("finetune", "--model", transformers_dir, "--data", str(data), "--output",
               str(tmp_path / "o"))
    assert run.returncode == 1 and f"{data}:2: not valid JSON" in run.stderr


def test_finetune_batch_must_cover_every_device(transformers_dir, pairs_files, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    run = _cli("finetune", "--model", transformers_dir, "--data", pairs_files[0], "--output",
               str(tmp_path / "o"), "--batch-size", "2", env=env)
    assert run.returncode == 2
    assert "--batch-size 2 must be a multiple of the device count (4)" in run.stderr


def test_finetune_resume_equals_a_straight_run(transformers_dir, pairs_files, tmp_path):
    common = ["finetune", "--model", transformers_dir, "--data", pairs_files[0], "--batch-size",
              "8", "--max-length", "16", "--lr", "3e-3", "--save-state"]
    straight, first, resumed = (str(tmp_path / n) for n in ("straight", "first", "resumed"))
    for args in ([*common, "--output", straight, "--steps", "5"],
                 [*common, "--output", first, "--steps", "2"],
                 [*common, "--output", resumed, "--steps", "5", "--resume",
                  os.path.join(first, "train_state.safetensors")]):
        run = _cli(*args)
        assert run.returncode == 0, run.stderr[-3000:]
    a = JinaEmbeddingsV3.from_pretrained(straight).adapters
    b = JinaEmbeddingsV3.from_pretrained(resumed).adapters
    for task in ("retrieval.query", "retrieval.passage"):
        for x, y in zip(_leaves(a[task]), _leaves(b[task])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
