"""The released model compiled for an H200 on this CPU host (`jina_jax.aot`): cuDNN's fused
attention is in the compiled program and the memory XLA plans stays within the bounds below.

Runs only in the GPU virtualenv `.ci/run` builds (jax-cuda12-plugin/pjrt 0.10.2, the cuDNN and
nvcc wheels, JAX_PLATFORMS=cpu): `python -m pytest -m gpu_aot tests/accel`. Nothing runs on a GPU:
whether cuDNN accepts each graph at run time is only known on one.
"""

import time

import pytest

pytestmark = pytest.mark.gpu_aot

GIB = 1 << 30
SHAPES = [(8, 512), (64, 512), (1, 8192)]
# Temporaries a device (bf16, 24 layers), with room over what jax 0.10.2 plans (README,
# "Accelerators"): 8x512 0.07 GiB, 64x512 0.5, 1x8192 0.14. The XLA path at 1x8192 would plan
# 6 GiB (its [1, 16, 8192, 8192] logits), so losing cuDNN there breaks the bound.
TEMP_BOUND = {(8, 512): 0.25 * GIB, (64, 512): 1.5 * GIB, (1, 8192): 0.5 * GIB}
# The train step (8 pairs of 512 tokens, remat "full"): fp32 base weights 2.2 GiB as arguments.
TRAIN_TEMP_BOUND = 2 * GIB


@pytest.fixture(scope="module")
def aot():
    from jina_jax import aot

    start = time.perf_counter()
    aot.devices("h200")
    print(f"\nH200 target described in {time.perf_counter() - start:.1f} s")
    return aot


@pytest.mark.parametrize("task", ["retrieval.passage", "mixed"])
@pytest.mark.parametrize("output", ["pooled", "hidden"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_compiles_with_cudnn(aot, shape, output, task):
    c = aot.compile_forward("h200", *shape, task=task, output=output, dtype="bfloat16")
    print(c.summary())
    assert c.attention == "cudnn"
    assert "__cudnn$fmhaSoftmax" in c.kernels
    assert c.temp_bytes <= TEMP_BOUND[shape], c.summary()
    assert c.fits
    # no second copy of the weights for a task: a single task runs on the base weights plus
    # its factors, as the mixed path does
    assert c.resident_bytes == 0


def test_train_step_compiles_with_cudnn_forward_and_backward(aot):
    c = aot.compile_train_step("h200", 8, 512, remat="full", dtype="bfloat16")
    print(c.summary())
    assert c.attention == "cudnn"
    assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= set(c.kernels)
    assert c.temp_bytes <= TRAIN_TEMP_BOUND, c.summary()
