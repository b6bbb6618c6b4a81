"""The GPU check, one short script for an H100/H200-class machine (JAX with CUDA, PyTorch).

    python benchmarks/gpu.py [--layers 24]

1. Compiles the bf16 forward and checks its HLO holds cuDNN's fused attention call.
2. tokens/s at 32x512 and 4x8192 (bf16) for jina-jax and Transformers sdpa, same weights.
3. A bf16 GEMM rate, and utilisation = model FLOPs/token x tokens/s / that rate.
Prints one table. On a machine without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from jina_jax import JinaEmbeddingsV3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def gpu_available() -> bool:
    try:
        import jax
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def median_time(fn, repeats=5):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=24)
    args = p.parse_args()
    if not gpu_available():
        print("no GPU: JAX sees no CUDA device here; nothing measured (run this on a GPU machine)")
        return 0

    import jax
    import jax.numpy as jnp
    import torch

    from harness import build_reference, flops_per_token

    folder = build_reference(tempfile.mkdtemp(prefix="jina-gpu-"), args.layers)
    model = JinaEmbeddingsV3.from_pretrained(folder, dtype="bfloat16")

    # 1. The fused attention really is in the compiled program.
    ids = np.ones((4, 512), np.int32)
    lengths = np.full((4,), 512, np.int32)
    hlo = model.lower(ids, lengths=lengths).compile().as_text()
    fused = "__cudnn$fmha" in hlo
    print(f"cuDNN fused attention in the bf16 HLO: {'yes' if fused else 'NO'}")

    # 3. bf16 GEMM rate.
    n = 8192
    x = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    rate = 2 * n ** 3 / median_time(lambda: mm(x).block_until_ready())

    from transformers import JinaEmbeddingsV3Model
    ref = JinaEmbeddingsV3Model.from_pretrained(folder, attn_implementation="sdpa",
                                                dtype=torch.bfloat16).cuda().eval()
    rows = []
    for b, l in ((32, 512), (4, 8192)):
        ids = np.random.default_rng(0).integers(3, 250000, (b, l)).astype(np.int32)
        mask = np.ones_like(ids)
        ours = median_time(lambda: model(ids, mask).last_hidden_state.block_until_ready())
        t_ids = torch.from_numpy(ids).long().cuda()
        t_mask = torch.ones_like(t_ids)

        def theirs():
            with torch.inference_mode():
                ref(input_ids=t_ids, attention_mask=t_mask)
            torch.cuda.synchronize()

        other = median_time(theirs)
        ours_tps, their_tps = b * l / ours, b * l / other
        util = flops_per_token(args.layers, l) * ours_tps / rate
        rows.append((f"{b}x{l}", ours_tps, their_tps, ours_tps / their_tps, util))

    print(f"\nbf16, {args.layers} layers, GEMM {rate / 1e12:.0f} TFLOP/s, "
          f"device {jax.devices()[0].device_kind}")
    print(f"{'shape':>8} {'jina-jax tok/s':>15} {'transformers tok/s':>19} {'ratio':>6} {'util':>6}")
    for shape, a, b_, r, u in rows:
        print(f"{shape:>8} {a:15.0f} {b_:19.0f} {r:6.2f} {u:6.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
