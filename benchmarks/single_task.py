"""One task's forward three ways, side by side in one process on the same weights:

- merged: `params_for(task)`, a full merged copy of the adapted weights `W + s·B·A` (what the
  model cached per task before), run as the base model plus the word-embedding factors;
- in_scan: the base weights and the task's factors, each layer's weights merged inside the
  layer scan (one layer's merged weights alive at a time; this script's own Linear, swapped in
  with `flax.linen.intercept_methods`);
- low_rank: the base weights and the task's factors, `x·W + (x·A)·(s·B)` (the model's default).

    python benchmarks/single_task.py [--layers 6] [--shapes 8x128,32x32,1x2048,1x32] [--rounds 5]
    python benchmarks/single_task.py --memory --layers 24 --shapes 1x8192

`--memory`: nothing runs and no weights are allocated; XLA's own accounting (`memory_analysis`
of the compiled pooled forward, attention as the model picks it) of the base model (no adapter)
and of one task through the low-rank path: argument and temporary bytes.

Weights: a random release checkpoint (`jina-jax random-checkpoint`: released widths, five rank-4
adapters on every Linear and Embedding, non-zero B), `--layers` deep, fp32. Each round times every
way once per shape (the median of `--calls` calls), interleaved, so a busy moment of a shared
machine favours none; each way takes its best round. Also printed: the bytes a task adds to the
weight arguments (what stays alive per task), XLA's temporary bytes per shape (`memory_analysis`), and each way's
max-abs difference from `merged` (mean-pooled fp32). One JSON line per shape, then a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convert.random_checkpoint import write_random_release
from jina_jax import JinaEmbeddingsV3, lora
from jina_jax.attention import choose_implementation
from jina_jax.config import JinaConfig
from jina_jax.encoder import JinaEncoder, Linear, mean_pool

TASK = "retrieval.passage"
WAYS = ("merged", "in_scan", "low_rank")


def extra_bytes(tree, base) -> int:
    """Bytes of `tree`'s arrays that are not arrays of `base` (what a task adds)."""
    shared = {id(x) for x in jax.tree_util.tree_leaves(base)}
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree) if id(x) not in shared)


def passthrough(next_fun, args, kwargs, context):
    return next_fun(*args, **kwargs)


def merge_in_scan(next_fun, args, kwargs, context):
    """A Linear given one task's factors (no task_index) merges them into its own kernel (fp32,
    stored back in the parameter dtype, as `lora.merge` does) and runs one matmul: inside the
    layer scan, so only the current layer's merged weights exist."""
    module = context.module
    if not (isinstance(module, Linear) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    x, lora, task_index = (list(args) + [None, None])[:3]
    if lora is None or task_index is not None:
        return next_fun(*args, **kwargs)
    params = module.variables["params"]
    kernel = params["kernel"]
    a, b = (jnp.asarray(lora[k][0], jnp.float32) for k in "ab")
    merged = (kernel.astype(jnp.float32) + a @ b).astype(kernel.dtype).astype(module.dtype)
    x = x.astype(module.dtype)
    return jnp.einsum("bli,io->blo", x, merged) + params["bias"].astype(module.dtype)


def memory(layers: int, shapes) -> None:
    cfg = JinaConfig(num_hidden_layers=layers)
    params = jax.eval_shape(lambda i: JinaEncoder(cfg).init(jax.random.PRNGKey(0), i),
                            jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]
    factors = jax.eval_shape(lambda p: lora.single_task(
        {TASK: lora.init_adapter(p, cfg.lora_rank)}, {TASK: 0.25}, TASK), params)
    for rows, length in shapes:
        module = JinaEncoder(cfg, implementation=choose_implementation(
            jnp.float32, cfg.head_dim, True, length))
        f = jax.jit(lambda p, l, i, n: mean_pool(
            module.apply({"params": p}, i, lengths=n, lora=l).last_hidden_state, n))
        ids, n = (jax.ShapeDtypeStruct(s, jnp.int32) for s in ((rows, length), (rows,)))
        record = {"layers": layers, "shape": f"{rows}x{length}"}
        for way, l in (("base", None), ("low_rank", factors)):
            mem = f.lower(params, l, ids, n).compile().memory_analysis()
            record[f"{way}_argument_mb"] = round(mem.argument_size_in_bytes / 1e6, 1)
            record[f"{way}_temp_mb"] = round(mem.temp_size_in_bytes / 1e6, 1)
        print(json.dumps(record), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--shapes", default="8x128,32x32,1x2048,1x32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--memory", action="store_true")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.memory:
        return memory(args.layers, shapes)

    with tempfile.TemporaryDirectory(prefix="jina-single-task-") as tmp:
        folder = write_random_release(f"{tmp}/release", JinaConfig(num_hidden_layers=args.layers),
                                      dtype="float32")
        model = JinaEmbeddingsV3.from_pretrained(folder)
    module = model.module()
    inputs = {"merged": model.params_for(TASK), "in_scan": model.params_for(TASK, merge=False),
              "low_rank": model.params_for(TASK, merge=False)}

    def make(way):
        def forward(params, lora, ids, lengths):
            with nn.intercept_methods(merge_in_scan if way == "in_scan" else passthrough):
                out = module.apply({"params": params}, ids, lengths=lengths, lora=lora)
            return mean_pool(out.last_hidden_state, lengths)
        return jax.jit(forward)

    functions = {way: make(way) for way in WAYS}
    rng = np.random.default_rng(0)
    records = []
    for rows, length in shapes:
        ids = rng.integers(5, 1000, (rows, length)).astype(np.int32)
        # Mixed lengths, as encode's batches have them.
        lengths = np.maximum(1, length - rng.integers(0, max(1, length // 4), rows)).astype(np.int32)
        compiled, outputs, temp = {}, {}, {}
        for way in WAYS:
            params, lora = inputs[way]
            compiled[way] = functions[way].lower(params, lora, ids, lengths).compile()
            temp[way] = compiled[way].memory_analysis().temp_size_in_bytes
            outputs[way] = np.asarray(compiled[way](params, lora, ids, lengths))
        best = dict.fromkeys(WAYS, float("inf"))
        for _ in range(args.rounds):
            for way in WAYS:
                params, lora = inputs[way]
                times = []
                for _ in range(args.calls):
                    start = time.perf_counter()
                    compiled[way](params, lora, ids, lengths).block_until_ready()
                    times.append(time.perf_counter() - start)
                best[way] = min(best[way], statistics.median(times))
        tokens = rows * length
        record = {"shape": f"{rows}x{length}",
                  **{f"{way}_tok_s": round(tokens / best[way], 1) for way in WAYS},
                  **{f"{way}_vs_merged": round(best["merged"] / best[way], 3) for way in WAYS[1:]},
                  **{f"{way}_temp_mb": round(temp[way] / 1e6, 1) for way in WAYS},
                  **{f"{way}_max_abs": float(np.abs(outputs[way] - outputs["merged"]).max())
                     for way in WAYS[1:]}}
        records.append(record)
        print(json.dumps(record), flush=True)
    print(json.dumps({"layers": args.layers, "task": TASK,
                      **{f"{way}_extra_mb": round(extra_bytes(inputs[way], model.params) / 1e6, 1)
                         for way in WAYS},
                      "base_params_mb": round(extra_bytes(model.params, {}) / 1e6, 1)}))


if __name__ == "__main__":
    main()
