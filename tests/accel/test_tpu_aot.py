"""The released model compiled for a TPU v5e on this CPU host (`jina_jax.aot`): the Pallas
splash kernel is in the compiled program (a Mosaic `tpu_custom_call`) and the program fits a
v5e chip's 16 GiB, on one chip and on a 2x2 slice (data parallel, weights replicated or split).

Runs only in the TPU virtualenv `.ci/run` builds (jax[tpu]==0.10.2):
`python -m pytest -m tpu_aot tests/accel`. Nothing runs on a TPU.
"""

import time

import pytest

pytestmark = pytest.mark.tpu_aot

GIB = 1 << 30
# (target, rows, width, output, task, shard_params)
FORWARDS = [
    ("v5e-1", 8, 512, "pooled", "retrieval.passage", False),
    ("v5e-1", 64, 512, "hidden", "mixed", False),
    ("v5e-1", 1, 8192, "pooled", "retrieval.passage", False),
    ("v5e-4", 64, 512, "pooled", "retrieval.passage", False),
    ("v5e-4", 64, 512, "pooled", "mixed", True),
]


@pytest.fixture(scope="module")
def aot():
    from jina_jax import aot

    start = time.perf_counter()
    aot.devices("v5e-1"), aot.devices("v5e-4")
    print(f"\nv5e targets described in {time.perf_counter() - start:.1f} s")
    return aot


@pytest.mark.parametrize("case", FORWARDS, ids=lambda c: "-".join(map(str, c)))
def test_forward_compiles_with_the_pallas_kernel(aot, case):
    target, rows, width, output, task, shard = case
    c = aot.compile_forward(target, rows, width, task=task, output=output, dtype="bfloat16",
                            shard_params=shard)
    print(c.summary())
    assert c.attention == "splash"
    assert "tpu_custom_call" in c.kernels
    assert c.target.usable == 16 * GIB and c.fits, c.summary()
    if target == "v5e-4":
        # Data parallel: a device holds a quarter of the rows (the kernel runs per device
        # under shard_map; XLA cannot split a Mosaic call) ...
        text = c.executable.as_text()
        assert "all-gather" not in text or shard
        if shard:  # ... and with split weights a quarter of the large ones.
            assert c.argument_bytes < 0.5 * GIB, c.summary()


@pytest.mark.parametrize("target,shard", [("v5e-1", False), ("v5e-4", True)])
def test_train_step_compiles_with_the_pallas_kernel(aot, target, shard):
    c = aot.compile_train_step(target, 8, 512, remat="full", dtype="bfloat16", shard_params=shard)
    print(c.summary())
    assert c.attention == "splash"
    # forward, and the backward's dq and dk/dv kernels
    assert "tpu_custom_call" in c.kernels
    assert c.executable.as_text().count("tpu_custom_call") >= 3
    assert c.fits, c.summary()
