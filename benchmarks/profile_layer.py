"""Where one encoder layer's time goes, at released widths: each part jitted and timed alone.

    python benchmarks/profile_layer.py --shape 8x128 [--shape 1x8192 ...]

Parts: the four matmuls (qkv, out, fc1, fc2) with their biases, attention (RoPE + softmax
attention, the implementation the model would choose), the elementwise rest (GELU, residuals,
two LayerNorms), and the whole layer as the model runs it. Each line gives milliseconds, the
share of the whole layer, and GFLOP/s for the matmul parts; the fp32 GEMM rate through XLA is
measured in the same run for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jina_jax import JinaConfig
from jina_jax.attention import choose_implementation, dot_product_attention
from jina_jax.encoder import Layer, LayerNorm, apply_rope, rope_tables


def timed(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile(b: int, l: int):
    cfg = JinaConfig(num_hidden_layers=1)
    h, f, n, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    x = jax.random.normal(next(keys), (b, l, h))
    w = {name: jax.random.normal(next(keys), shape) * 0.02 for name, shape in
         {"qkv": (h, 3 * h), "out": (h, h), "fc1": (h, f), "fc2": (f, h)}.items()}
    inputs = {"qkv": x, "out": x, "fc1": x, "fc2": jax.random.normal(next(keys), (b, l, f))}
    impl = choose_implementation(jnp.float32, d, True, l)
    rows = []
    for name in ("qkv", "out", "fc1", "fc2"):
        kernel, inp = w[name], inputs[name]
        bias = jnp.zeros((kernel.shape[1],))
        fn = jax.jit(lambda a, k, c: jnp.einsum("bli,io->blo", a, k) + c)
        t = timed(fn, inp, kernel, bias)
        rows.append((f"matmul {name}", t, 2 * b * l * kernel.shape[0] * kernel.shape[1] / t))

    q, k, v = (jax.random.normal(next(keys), (b, l, n, d)) for _ in range(3))
    cos, sin = rope_tables(l, d, cfg.rope_theta, jnp.float32)
    lengths = jnp.full((b,), l, jnp.int32)
    attn = jax.jit(lambda q, k, v: dot_product_attention(
        apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, lengths=lengths, implementation=impl))
    t = timed(attn, q, k, v)
    rows.append((f"attention ({impl})", t, 4 * b * l * l * h / t))

    norm = LayerNorm(cfg.layer_norm_eps, jnp.float32, jnp.float32)
    nparams = norm.init(next(keys), x)
    y = inputs["fc2"]
    rest = jax.jit(lambda x, y: (norm.apply(nparams, x + x), jax.nn.gelu(y, approximate=False),
                                 norm.apply(nparams, x + x)))
    rows.append(("elementwise (GELU, residual+LN x2)", timed(rest, x, y), None))

    layer = Layer(cfg, jnp.float32, jnp.float32, impl)
    lp = layer.init(next(keys), x, None, cos, sin, lengths, None, None, None)
    whole = jax.jit(lambda p, x: layer.apply(p, x, None, cos, sin, lengths, None, None, None)[0])
    total = timed(whole, lp, x)
    return rows, total


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", action="append", default=None)
    args = p.parse_args()
    sq = jnp.ones((2048, 2048), jnp.float32)
    gemm = 2 * 2048 ** 3 / timed(jax.jit(lambda a: a @ a), sq)
    print(f"fp32 GEMM through XLA (2048^3): {gemm / 1e9:.0f} GFLOP/s")
    for shape in args.shape or ["8x128"]:
        b, l = (int(s) for s in shape.split("x"))
        rows, total = profile(b, l)
        print(f"\none layer at {b}x{l}: {total * 1e3:.1f} ms "
              f"({b * l / total / 24:.0f} tok/s for 24 layers)")
        for name, t, rate in rows:
            extra = "" if rate is None else f"  {rate / 1e9:6.0f} GFLOP/s"
            print(f"  {name:<36} {t * 1e3:8.2f} ms  {t / total:6.1%}{extra}")
        print(f"  {'sum of parts':<36} {sum(t for _, t, _ in rows) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
