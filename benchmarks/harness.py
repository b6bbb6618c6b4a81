"""jina-jax against Transformers (sdpa) and ONNX Runtime, side by side, same weights, same process.

    python benchmarks/harness.py --layers 6 --shapes 8x128,2x512 --dtypes float32
    python benchmarks/harness.py --layers 24 --shapes 1x8192 --contenders jax,torch

One random-weight Transformers model at the released widths (1024 wide, 16 heads, FFN 4096,
vocab 250002; `--layers` deep) is saved once; jina-jax loads it through its converter, ONNX
Runtime runs its `torch.onnx.export(dynamo=True)` export. Every contender's output is checked
against Transformers' before it is timed; one that disagrees is reported as such, never timed.
Timings: warm-up, then the median of `--repeats` runs. Utilisation is model FLOPs per token x
tokens/s over this machine's fp32 GEMM rate, measured through XLA in the same run.

Prints a table and writes a JSON record (`--json`). Needs the test extra (torch, transformers)
and, for the ONNX contender, `pip install onnxruntime onnxscript`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time

import numpy as np

from jina_jax import JinaEmbeddingsV3

H, HEADS, FFN, VOCAB = 1024, 16, 4096, 250002
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25}  # max-abs on last_hidden_state vs Transformers


def flops_per_token(layers: int, length: int) -> float:
    """Matmul FLOPs per token: projections and FFN, plus QK^T and PV over `length` keys."""
    dense = 2 * (3 * H * H + H * H + 2 * H * FFN)
    attention = 2 * 2 * length * H
    return layers * (dense + attention)


def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def build_reference(folder: str, layers: int, seed: int = 0):
    import torch
    from transformers import JinaEmbeddingsV3Config, JinaEmbeddingsV3Model

    torch.manual_seed(seed)
    cfg = JinaEmbeddingsV3Config(num_hidden_layers=layers)
    model = JinaEmbeddingsV3Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    return folder


class Contender:
    name = ""

    def run(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class JaxContender(Contender):
    name = "jina-jax"

    def __init__(self, folder, dtype):
        self.model = JinaEmbeddingsV3.from_pretrained(folder, dtype=dtype)

    def run(self, ids):
        out = self.model(ids, np.ones_like(ids)).last_hidden_state
        return np.asarray(out.astype("float32"))


class TorchContender(Contender):
    name = "transformers"

    def __init__(self, folder, dtype):
        import torch
        from transformers import JinaEmbeddingsV3Model

        self.torch = torch
        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.model = JinaEmbeddingsV3Model.from_pretrained(
            folder, attn_implementation="sdpa", dtype=tdtype).eval()

    def run(self, ids):
        with self.torch.inference_mode():
            t = self.torch.from_numpy(ids).long()
            out = self.model(input_ids=t, attention_mask=self.torch.ones_like(t))
        return out.last_hidden_state.float().numpy()


class OrtContender(Contender):
    name = "onnxruntime"

    def __init__(self, folder, dtype, workdir):
        import onnxruntime as ort
        import torch
        from transformers import JinaEmbeddingsV3Model

        if dtype != "float32":
            raise RuntimeError("the ONNX contender runs fp32 only")
        model = JinaEmbeddingsV3Model.from_pretrained(folder).eval()

        class Wrapped(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        path = os.path.join(workdir, "model.onnx")
        ids = torch.ones((2, 16), dtype=torch.long)
        batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2, max=8192)
        torch.onnx.export(Wrapped(model).eval(), (ids, torch.ones_like(ids)), path, dynamo=True,
                          dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                          input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], external_data=True)
        del model
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def run(self, ids):
        ids = ids.astype(np.int64)
        return self.session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def time_contender(contender, ids, repeats, warmups=1):
    start = time.perf_counter()
    out = contender.run(ids)
    first = time.perf_counter() - start
    for _ in range(warmups):
        contender.run(ids)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        contender.run(ids)
        times.append(time.perf_counter() - start)
    return out, first, statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--shapes", default="8x128,2x512")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--contenders", default="jax,torch,ort")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmups", type=int, default=1, help="runs after the first, untimed")
    p.add_argument("--json", default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    workdir = args.workdir or tempfile.mkdtemp(prefix="jina-harness-")
    folder = os.path.join(workdir, f"reference-{args.layers}")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        build_reference(folder, args.layers)
    rate = gemm_rate()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    wanted = args.contenders.split(",")
    rows = []
    for dtype in args.dtypes.split(","):
        contenders, skipped = {}, {}
        for key, make in (("torch", lambda: TorchContender(folder, dtype)),
                          ("jax", lambda: JaxContender(folder, dtype)),
                          ("ort", lambda: OrtContender(folder, dtype, workdir))):
            if key not in wanted:
                continue
            try:
                contenders[key] = make()
            except Exception as e:  # noqa: BLE001 - a contender that cannot start is reported
                skipped[key] = f"{type(e).__name__}: {str(e)[:200]}"
        for b, l in shapes:
            ids = np.random.default_rng(b * l).integers(3, VOCAB - 1, (b, l)).astype(np.int64)
            ids[:, 0], ids[:, -1] = 0, 2
            reference = None
            results = {}
            for key in ("torch", "jax", "ort"):
                if key not in contenders:
                    continue
                out, first, median = time_contender(contenders[key], ids, args.repeats, args.warmups)
                if reference is None:
                    reference = out if key == "torch" else None
                err = None if reference is None else float(np.abs(out - reference).max())
                ok = err is None or err <= TOLERANCE[dtype]
                results[key] = {"tok_s": b * l / median if ok else None, "first_s": first,
                                "max_err_vs_transformers": err, "agrees": ok}
            base = results.get("jax", {}).get("tok_s")
            for key, r in results.items():
                r["ratio_to_jax"] = (r["tok_s"] / base) if (r["tok_s"] and base) else None
                r["utilisation"] = (flops_per_token(args.layers, l) * r["tok_s"] / rate
                                    if r["tok_s"] else None)
            rows.append({"dtype": dtype, "batch": b, "length": l, "results": results,
                         "skipped": skipped})
            _print_row(rows[-1], args.layers)
    record = {"layers": args.layers, "gemm_gflops": rate / 1e9, "machine": platform.processor()
              or platform.machine(), "cpus": os.cpu_count(), "rows": rows,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    print(f"fp32 GEMM through XLA: {rate / 1e9:.0f} GFLOP/s; process peak RSS "
          f"{record['peak_rss_gb']:.2f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


def _print_row(row, layers):
    head = f"{row['dtype']:>8} {row['batch']}x{row['length']:<5} L={layers}"
    for key, r in row["results"].items():
        name = {"torch": "transformers", "jax": "jina-jax", "ort": "onnxruntime"}[key]
        if not r["agrees"]:
            print(f"{head}  {name:>12}: DISAGREES with Transformers (max err "
                  f"{r['max_err_vs_transformers']:.3g}); not reported")
            continue
        ratio = "" if r["ratio_to_jax"] is None else f"  {r['ratio_to_jax']:.2f}x of jina-jax"
        err = "" if r["max_err_vs_transformers"] is None else f"  err {r['max_err_vs_transformers']:.1e}"
        print(f"{head}  {name:>12}: {r['tok_s']:8.1f} tok/s  first {r['first_s']:6.2f}s  "
              f"util {r['utilisation']:.0%}{ratio}{err}", flush=True)
    for key, why in row["skipped"].items():
        print(f"{head}  {key:>12}: skipped ({why})")


if __name__ == "__main__":
    main()
