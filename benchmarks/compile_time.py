"""Compile time of the forward at released widths: 24 layers vs 2 (scan keeps it flat).

    python benchmarks/compile_time.py [--batch 8 --length 128]

Nothing is allocated: parameters are abstract (`jax.eval_shape`), only XLA compilation runs.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from jina_jax import JinaConfig, JinaEncoder


def compile_seconds(layers: int, batch: int, length: int, scan: bool, task: bool) -> float:
    cfg = JinaConfig(num_hidden_layers=layers)
    module = JinaEncoder(cfg, scan_layers=scan)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = jax.eval_shape(lambda i: module.init(jax.random.PRNGKey(0), i), ids)["params"]
    lora = None
    if task:  # the single-task path: merged weights + word-embedding factors [1, V, r], [1, r, H]
        lora = {"embeddings": {"word": {
            "a": jax.ShapeDtypeStruct((1, cfg.vocab_size, cfg.lora_rank), jnp.float32),
            "b": jax.ShapeDtypeStruct((1, cfg.lora_rank, cfg.hidden_size), jnp.float32)}}}

    def forward(p, i, n, lo):
        return module.apply({"params": p}, i, lengths=n, lora=lo)

    start = time.perf_counter()
    jax.jit(forward).lower(params, ids, lengths, lora).compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for scan in (True, False):
        for task in (False, True):
            times = {}
            for layers in (2, 24):
                runs = [compile_seconds(layers, args.batch, args.length, scan, task)
                        for _ in range(args.repeats)]
                times[layers] = sorted(runs)[len(runs) // 2]
            rows.append({"scan": scan, "task": task, "compile_s_2": round(times[2], 3),
                         "compile_s_24": round(times[24], 3),
                         "ratio_24_vs_2": round(times[24] / times[2], 3)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
