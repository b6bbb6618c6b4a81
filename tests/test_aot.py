"""`jina_jax.aot` on this host's CPU (the "cpu" target): the machinery the GPU and TPU compiles
use (tests/accel, run by .ci/run in their own virtualenvs), with a small model."""

import importlib.util
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jina_jax import aot
from jina_jax.config import JinaConfig
from jina_jax.sharding import Layout, batch_mesh

TINY = JinaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128)


def test_targets_by_name_and_topology():
    assert aot.target("h200").backend == "gpu" and aot.target("H100").platform == "cuda"
    v5e4 = aot.target("v5e-4")
    assert (v5e4.backend, v5e4.topology, v5e4.chips, v5e4.memory) == ("tpu", "v5e:2x2", 4, 16 << 30)
    assert aot.target("v5e:2x4").chips == 8 and aot.target("v6e:1x1").memory == 32 << 30
    # JAX on a GPU may use 75% of it by default; a TPU all of its HBM
    assert aot.target("h200").usable == int(0.75 * aot.target("h200").memory)
    for bad in ("a100", "v5e:", "v9:2x2", "v5e:2xq"):
        with pytest.raises(ValueError, match="unknown target"):
            aot.target(bad)


@pytest.mark.skipif(importlib.util.find_spec("jax_plugins") is not None,
                    reason="a JAX plugin is installed here")
def test_a_missing_plugin_is_named():
    with pytest.raises(RuntimeError, match=r"jina-jax\[cuda12\]"):
        aot.devices("h200")


def test_shapes_are_placed_as_shapes():
    layout = Layout(batch_mesh(jax.devices("cpu")[:1]), shard_params=True)
    tree = {"w": jax.ShapeDtypeStruct((512, 256), np.float32), "x": np.ones(3, np.float32)}
    placed = layout.place(tree)
    assert isinstance(placed["w"], jax.ShapeDtypeStruct)
    assert placed["w"].sharding == layout.sharding(PartitionSpec("data"))
    assert isinstance(placed["x"], jax.Array)


def test_forward_memory_and_task_weights():
    single = aot.compile_forward("cpu", 4, 64, task="retrieval.passage", config=TINY)
    mixed = aot.compile_forward("cpu", 4, 64, task="mixed", output="hidden", config=TINY)
    none = aot.compile_forward("cpu", 4, 64, task=None, config=TINY)
    weights = aot.nbytes(aot.abstract_model("cpu", config=TINY).params)
    for c in (single, mixed, none):
        assert c.attention == "xla" and c.kernels == ()
        assert c.argument_bytes >= weights and c.temp_bytes > 0 and c.fits
        assert c.total_bytes == (c.argument_bytes + c.output_bytes - c.alias_bytes + c.temp_bytes
                                 + c.resident_bytes)
    # No second copy of the weights for a task: a single task runs on the base weights plus
    # its factors, like the per-row path; no task runs with zero factors of the same shapes
    # (one compiled forward for every task).
    assert single.resident_bytes == mixed.resident_bytes == none.resident_bytes == 0
    assert single.argument_bytes == none.argument_bytes < mixed.argument_bytes
    assert mixed.output_bytes == 4 * 64 * 64 * 2 and none.output_bytes == 4 * 64 * 4
    assert aot.compile_forward("cpu", 1, 1024, config=TINY).attention == "blockwise"


def test_train_step_compiles():
    full = aot.compile_train_step("cpu", 2, 64, remat="full", config=TINY)
    assert full.what == "train step remat=full" and full.fits and full.attention == "xla"
    assert full.argument_bytes > aot.nbytes(aot.abstract_model("cpu", config=TINY).params)


@pytest.mark.slow
def test_remat_saves_train_step_memory():
    full = aot.compile_train_step("cpu", 4, 128, remat="full", config=TINY)
    keep = aot.compile_train_step("cpu", 4, 128, remat=None, config=TINY)
    assert full.temp_bytes < keep.temp_bytes


def test_largest_batch_is_the_edge():
    """On a made-up device of 64 MiB: the rows it returns fit and one more does not."""
    small = aot.Target("cpu-64m", "cpu", "1", 64 << 20)
    rows, c = aot.largest_batch(small, 128, config=TINY)
    assert rows >= 2 and c.fits and c.shape == (rows, 128)
    assert not aot.compile_forward(small, rows + 1, 128, config=TINY).fits


def test_plan_refuses_an_unknown_target():
    r = subprocess.run([sys.executable, "-m", "jina_jax.cli", "plan", "--target", "a100"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--target" in r.stderr and "v5e-4" in r.stderr


def test_server_set_from_weight_shapes():
    """`plan`'s server section: the warm-up set comes from weight shapes alone (a Batcher over
    an abstract model never stacks its adapters)."""
    shapes = aot.server_set(aot.abstract_model("cpu", config=TINY), 64)
    assert shapes and max(w for _, w in shapes) == 64 and max(r for r, _ in shapes) == 64
