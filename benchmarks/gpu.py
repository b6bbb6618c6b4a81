"""The GPU check: one short script for a lent H100/H200 (JAX with CUDA; PyTorch, Transformers
and PEFT for the reference).

    python benchmarks/gpu.py [--layers 24] [--texts 4096]
    python benchmarks/gpu.py --smoke      # every step on this machine's device, tiny sizes

Weights: random at the released widths (1024 wide, 16 heads, FFN 4096, vocab 250002, `--layers`
deep) with a PEFT LoRA adapter `retrieval_passage` (rank 4, every Linear, non-zero B), written by
`encode_throughput.write_weights`; both sides read that folder.

1. Parity against Transformers + PEFT in fp32 on the GPU (a padded batch of mixed lengths,
   max-abs over real tokens of last_hidden_state): jina-jax fp32 with JAX's default matmul
   precision (TF32 on GPU) and with precision="highest".
2. bf16: cuDNN's fused attention is in the compiled HLO; pooled cosine to the fp32 reference.
3. Forward tokens/s in bf16 at 64x512 and 4x8192: jina-jax against Transformers + PEFT (sdpa).
4. `encode` of `--texts` mixed texts (queries, paragraphs, long documents; bf16) against a
   Transformers + PEFT bf16 loop as users write it (sorted, padded per batch, mean pool): first
   call and steady.
5. Utilisation: model FLOPs per token x tokens/s over a bf16 GEMM rate measured in this run.
6. The plan's GPU default (`cost.default`, no calibration cached) against a calibration on this
   device (`cost.calibrate`, not saved): each timed shape's prediction by both, then `encode`
   of a small corpus (160 texts, a RAG call) planned with each and with the padding rule alone,
   steady seconds side by side (bf16).
Prints one table. On a machine without a GPU (and without --smoke) it says so and exits 0.
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
from jina_jax import cost as cost_lib
from jina_jax.encode import Runner, finish, progress
from jina_jax.tokenize import token_ids

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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--texts", type=int, default=4096)
    p.add_argument("--smoke", action="store_true",
                   help="run every step on whatever device there is, at tiny sizes")
    args = p.parse_args()
    if not gpu_available() and not args.smoke:
        print("no GPU: JAX sees no CUDA device here; nothing measured (run this on a GPU machine)")
        return 0
    if args.smoke:
        args.layers, args.texts = 1, 48

    import jax
    import jax.numpy as jnp
    import torch
    from peft import PeftModel
    from transformers import JinaEmbeddingsV3Model

    from encode_throughput import TorchLoop, corpus, write_weights
    from harness import flops_per_token

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    folder = write_weights(tempfile.mkdtemp(prefix="jina-gpu-"), args.layers)
    adapter = os.path.join(folder, "retrieval_passage")
    task = "retrieval.passage"
    print(f"device: {jax.devices()[0].device_kind} (JAX), {device} (PyTorch); "
          f"{args.layers} layers", flush=True)

    # 1. fp32 parity, default precision and "highest".
    rng = np.random.default_rng(0)
    lengths = np.array([512, 300, 77, 5])
    ids = rng.integers(3, 250000, (4, 512)).astype(np.int32)
    mask = (np.arange(512)[None] < lengths[:, None]).astype(np.int32)
    ids[mask == 0] = 1
    ref32 = PeftModel.from_pretrained(JinaEmbeddingsV3Model.from_pretrained(
        folder, attn_implementation="sdpa", dtype=torch.float32), adapter).to(device).eval()
    with torch.inference_mode():
        theirs = ref32(input_ids=torch.from_numpy(ids).long().to(device),
                       attention_mask=torch.from_numpy(mask).to(device)).last_hidden_state
    theirs = theirs.float().cpu().numpy()
    del ref32
    real = mask.astype(bool)
    for precision in (None, "highest"):
        m32 = JinaEmbeddingsV3.from_pretrained(folder, dtype="float32", precision=precision)
        ours = np.asarray(m32(ids, mask, task=task).last_hidden_state)
        err = float(np.abs(ours - theirs)[real].max())
        print(f"fp32 parity, precision={precision or 'default'}: max-abs {err:.2e} "
              f"({'within' if err < 1e-4 else 'OVER'} 1e-4)", flush=True)
        del m32

    # 2. bf16: the fused kernel, and pooled cosine to the fp32 reference.
    model = JinaEmbeddingsV3.from_pretrained(folder, dtype="bfloat16")
    hlo = model.lower(ids, lengths=lengths.astype(np.int32), task=task).compile().as_text()
    print(f"cuDNN fused attention in the bf16 HLO: {'yes' if '__cudnn$fmha' in hlo else 'NO'}")
    pooled = np.asarray(model.pooled(ids, lengths.astype(np.int32), task))
    ref_pooled = (theirs * real[..., None]).sum(1) / real.sum(1, keepdims=True)
    cos = (pooled * ref_pooled).sum(1) / (np.linalg.norm(pooled, axis=1)
                                         * np.linalg.norm(ref_pooled, axis=1))
    print(f"bf16 pooled cosine to fp32 reference: min {cos.min():.5f}", flush=True)

    # 5 (first, for the table). bf16 GEMM rate.
    n = 8192 if not args.smoke else 512
    x = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    rate = 2 * n ** 3 / median_time(lambda: mm(x).block_until_ready())

    # 3. Forward tokens/s.
    ref = PeftModel.from_pretrained(JinaEmbeddingsV3Model.from_pretrained(
        folder, attn_implementation="sdpa", dtype=torch.bfloat16), adapter).to(device).eval()
    rows = []
    shapes = ((64, 512), (4, 8192)) if not args.smoke else ((2, 64), (1, 256))
    for b, length in shapes:
        batch = rng.integers(3, 250000, (b, length)).astype(np.int32)
        full = np.full((b,), length, np.int32)
        ours = median_time(lambda: model.pooled(batch, full, task).block_until_ready())
        t_ids = torch.from_numpy(batch).long().to(device)
        t_mask = torch.ones_like(t_ids)

        def theirs_fn():
            with torch.inference_mode():
                ref(input_ids=t_ids, attention_mask=t_mask)
            sync()

        other = median_time(theirs_fn)
        tps, their_tps = b * length / ours, b * length / other
        rows.append((f"forward {b}x{length}", tps, their_tps,
                     flops_per_token(args.layers, length) * tps / rate))
    del ref

    # 4. encode on a realistic mix against the loop users write.
    texts = corpus(args.texts / 520)
    tok = model.tokenizer
    tok.enable_truncation(8192)
    prefix = model.config.instruction(task)
    n_tokens = sum(len(e.ids) for e in tok.encode_batch([prefix + t for t in texts]))
    start = time.perf_counter()
    model.encode(texts, task=task)
    first = time.perf_counter() - start
    steady = median_time(lambda: model.encode(texts, task=task), repeats=2)
    torch.set_num_threads(os.cpu_count() or 1)
    torch_loop = TorchLoop(folder, prefix, "bfloat16", 32, device)
    _, loop_first = torch_loop(texts)
    _, loop = torch_loop(texts)
    mean_len = n_tokens / len(texts)
    rows.append((f"encode {len(texts)} texts", n_tokens / steady, n_tokens / loop,
                 flops_per_token(args.layers, mean_len) * n_tokens / steady / rate))
    print(f"encode first call: jina-jax {first:.1f} s, Transformers+PEFT {loop_first:.1f} s; "
          f"{n_tokens} tokens")

    # 6. The GPU default cost model against a calibration on this device.
    default = cost_lib.default(model.config, "gpu")
    calibrated = cost_lib.calibrate(model, task, save=False)
    print(f"\ncost model, default: {default}\ncalibrated: {calibrated}")
    for r, w in cost_lib.CALIBRATION_SHAPES:
        print(f"  {r}x{w}: default {1e3 * default.seconds(r, w):8.2f} ms, "
              f"calibrated {1e3 * calibrated.seconds(r, w):8.2f} ms")
    small = corpus(1.0, small=160 if not args.smoke else 24)
    small_ids = token_ids(tok, model.config, small, [model.resolve_task(task)] * len(small), 8192)
    small_tasks = [model.resolve_task(task)] * len(small)
    for name, cost in (("default", default), ("calibrated", calibrated), ("padding", None)):
        runner = Runner(model, 32, 16384, False, progress(None, 1, False), cost=cost)
        batches = runner.plan(small_ids, small_tasks)

        def run_small(runner=runner, batches=batches):
            out = runner.submit(small_ids, small_tasks, batches)
            runner.drain()
            return finish(out, model.config.hidden_size, True)

        seconds = median_time(run_small, repeats=3)
        print(f"small corpus ({len(small)} texts), {name} plan: {len(batches)} batches, "
              f"{len({(b.rows, b.width) for b in batches})} shapes, steady {seconds:.3f} s")

    print(f"\nbf16, {args.layers} layers, bf16 GEMM {rate / 1e12:.0f} TFLOP/s")
    print(f"{'what':>22} {'jina-jax tok/s':>15} {'Transformers+PEFT':>18} {'ratio':>6} "
          f"{'util':>6}")
    for what, ours_tps, their_tps, util in rows:
        print(f"{what:>22} {ours_tps:15.0f} {their_tps:18.0f} {ours_tps / their_tps:6.2f} "
              f"{util:6.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
