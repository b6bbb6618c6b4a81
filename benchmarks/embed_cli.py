"""`jina-jax embed` as a user runs it: a second process vs the first (the persistent compilation
cache), and peak memory against input size (streaming).

    python benchmarks/embed_cli.py compile [--layers 6] [--texts 256]
    python benchmarks/embed_cli.py memory [--lines 200000,1000000]

compile: a random release-format checkpoint at the released widths (`--layers` deep) and a file
of `--texts` mixed-length texts; `jina-jax embed` runs three times in fresh processes: with the
cache off, then twice with an empty cache folder (the first fills it, the second reads it).
Reports each process's wall time and the second/first ratio.

memory: a small random checkpoint (hidden 64, 1 layer, vocab 32000: the model is not what is
measured) and input files of `--lines` short lines; reports each `jina-jax embed` process's peak
RSS (the child's own `ru_maxrss`) and wall time. Bounded memory means the peak does not grow with
the number of lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from convert.random_checkpoint import write_random_release
from jina_jax import JinaConfig

EXE = shutil.which("jina-jax") or "jina-jax"
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def texts(n: int, seed: int = 0, scale: float = 1.0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the of and to in is that for it as was with be by on retrieval embedding".split()
    counts = np.clip(rng.lognormal(np.log(30 * scale), 1.0, n).astype(int), 1, 1500)
    return [" ".join(rng.choice(words, size=c)) for c in counts]


def embed(model, src, dst, cache, extra=()) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB, its summary line's shape counts) of one `jina-jax
    embed` process."""
    env = dict(os.environ, JINA_JAX_COMPILATION_CACHE=cache)
    cmd = [sys.executable, "-c", PEAK, EXE, "embed", "--model", model, "--task",
           "retrieval.passage", "--input", src, "--output", dst, "--overwrite", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    shapes = done.stderr.strip().splitlines()[-1].rpartition("; ")[2]
    return wall, int(done.stdout.strip().splitlines()[-1]), shapes


def compile_mode(args, work):
    model = os.path.join(work, f"random-{args.layers}")
    write_random_release(model, JinaConfig(num_hidden_layers=args.layers))
    src = os.path.join(work, "texts.txt")
    with open(src, "w") as f:
        f.write("\n".join(texts(args.texts)) + "\n")
    cache = os.path.join(work, "xla-cache")
    off, _, _ = embed(model, src, os.path.join(work, "off.npy"), "0")
    first, _, first_shapes = embed(model, src, os.path.join(work, "first.npy"), cache)
    second, _, second_shapes = embed(model, src, os.path.join(work, "second.npy"), cache)
    same = np.array_equal(np.load(os.path.join(work, "first.npy")),
                          np.load(os.path.join(work, "second.npy")))
    print(json.dumps({"layers": args.layers, "texts": args.texts, "cache_off_s": round(off, 2),
                      "first_s": round(first, 2), "second_s": round(second, 2),
                      "second_over_first": round(second / first, 3),
                      "first_shapes": first_shapes, "second_shapes": second_shapes,
                      "identical_output": bool(same)}))


def memory_mode(args, work):
    model = os.path.join(work, "tiny")
    write_random_release(model, JinaConfig(vocab_size=32000, hidden_size=64,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=128), dtype="float32")
    rows = []
    for n in (int(x) for x in args.lines.split(",")):
        src = os.path.join(work, f"lines-{n}.txt")
        with open(src, "w") as f:
            pool = texts(5000, scale=0.3)
            for i in range(n):
                f.write(pool[i % len(pool)] + "\n")
        wall, peak, _ = embed(model, src, os.path.join(work, f"out-{n}.npy"),
                           os.path.join(work, "xla-cache"))
        out = np.load(os.path.join(work, f"out-{n}.npy"), mmap_mode="r")
        rows.append({"lines": n, "peak_rss_mb": round(peak / 1024, 1), "wall_s": round(wall, 1),
                     "lines_per_s": round(n / wall, 1), "output_shape": list(out.shape)})
        os.remove(src)
    print(json.dumps(rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["compile", "memory"])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--lines", default="200000,1000000")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="jina-embed-bench-")
    try:
        (compile_mode if args.mode == "compile" else memory_mode)(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
