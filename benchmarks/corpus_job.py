"""The corpus job (`jina-jax embed --output FOLDER/`) against `encode()` on the same corpus, side
by side in one run: throughput, peak memory against corpus size, and resume after a kill.

    python benchmarks/corpus_job.py [--rows 131072] [--big-rows 1048576] [--shard-rows 16384]

Model: a random checkpoint with small widths (hidden 64, 1 layer, vocab 32000), so that what is
measured is the job's own cost around the model. Corpus: `--rows` rows of short and long texts
(a pool of 16,384 texts of lognormal word counts, 1 to 1000 words, repeated; ids "doc-<i>") in 4
Parquet files. Row counts that are multiples of the pool (= encode's window) make every window
the same mix, so every run meets the same shapes: after the first, none compiles, and what the
memory and resume runs compare is the job, not XLA's compiler.

1. rate: in one process, the job (Parquet in, shards + manifest out) and `encode()` of the same
   texts held in a list (reading them is not counted for encode), alternating for `--rounds`
   rounds after a warm-up that compiles every shape; the best round of each; job / encode.
2. memory: after a first `jina-jax embed` process that fills the compilation cache, processes
   on the `--rows` corpus and a `--big-rows` one (the same texts repeated, other ids): each
   child's peak RSS (ru_maxrss) and wall time (each summary says its shapes all came from the
   cache).
3. resume: a `jina-jax embed` process killed (SIGKILL) once half the shards are recorded,
   then the same command again: its wall time against a whole uninterrupted process's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from convert.random_checkpoint import write_random_release
from jina_jax import CorpusJob, JinaConfig, JinaEmbeddingsV3, embed_corpus, open_dataset

EXE = shutil.which("jina-jax") or "jina-jax"
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
TASK = "retrieval.passage"
POOL = 16384  # distinct texts, = encode's window


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the of and to in is that for it as was with be by on retrieval embedding".split()
    counts = np.clip(rng.lognormal(np.log(10), 1.0, n).astype(int), 1, 1000)
    return [" ".join(rng.choice(words, size=c)) for c in counts]


def write_corpus(folder: str, pool: list[str], rows: int, files: int = 4) -> None:
    os.makedirs(folder)
    per = -(-rows // files)
    for f in range(files):
        lo, hi = f * per, min(rows, (f + 1) * per)
        ids = [f"doc-{i}" for i in range(lo, hi)]
        body = [pool[i % len(pool)] for i in range(lo, hi)]
        pq.write_table(pa.table({"id": ids, "text": body}), os.path.join(folder, f"{f}.parquet"),
                       row_group_size=10_000)


def cli(model: str, corpus: str, out: str, shard_rows: int, cache: str) -> list[str]:
    return [EXE, "embed", "--model", model, "--task", TASK, "--input", corpus, "--output",
            out + "/", "--id-field", "id", "--shard-rows", str(shard_rows), "--quiet"]


def run_peak(cmd, cache) -> tuple[float, int, str]:
    env = dict(os.environ, JINA_JAX_COMPILATION_CACHE=cache)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *cmd], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return wall, int(done.stdout.strip().splitlines()[-1]), done.stderr.strip().splitlines()[-1]


def done_shards(folder: str) -> tuple[int, int]:
    """(shards recorded done, shards planned) of the folder's manifest; (0, 1) before it."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        return len(manifest["shards"]), len(manifest["header"]["plan"])
    except (OSError, ValueError, KeyError):
        return 0, 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=8 * POOL)
    p.add_argument("--big-rows", type=int, default=64 * POOL)
    p.add_argument("--shard-rows", type=int, default=POOL)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: rate,memory,big (the --big-rows "
                   "run),resume")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = tempfile.mkdtemp(prefix="jina-corpus-bench-")
    cache = os.path.join(work, "xla-cache")
    os.environ["JINA_JAX_COMPILATION_CACHE"] = cache
    report = {"rows": args.rows, "shard_rows": args.shard_rows}
    try:
        model_dir = os.path.join(work, "tiny")
        write_random_release(model_dir, JinaConfig(vocab_size=32000, hidden_size=64,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=128), dtype="float32")
        pool = texts(POOL)
        corpus = os.path.join(work, "corpus")
        write_corpus(corpus, pool, args.rows)
        model = JinaEmbeddingsV3.from_pretrained(model_dir)
        job = CorpusJob(inputs=(corpus,), task=TASK, id_field="id", shard_rows=args.shard_rows)

        if "rate" not in skip:
            body = [t for f in sorted(os.listdir(corpus))
                    for t in pq.read_table(os.path.join(corpus, f), columns=["text"])
                    .column("text").to_pylist()]
            out = os.path.join(work, "rate")
            embed_corpus(model, job, out, progress=False, log=None)  # compiles every shape
            rounds = []
            for r in range(args.rounds):
                start = time.perf_counter()
                emb = model.encode(body, task=TASK, show_progress_bar=False)
                encode_s = time.perf_counter() - start
                start = time.perf_counter()
                summary = embed_corpus(model, job, out, overwrite=True, progress=False, log=None)
                job_s = time.perf_counter() - start
                rounds.append({"encode_s": round(encode_s, 2), "job_s": round(job_s, 2)})
            ds = open_dataset(out)
            best_encode = min(r["encode_s"] for r in rounds)
            best_job = min(r["job_s"] for r in rounds)
            report["rate"] = {
                "rounds": rounds, "encode_rows_per_s": round(args.rows / best_encode, 1),
                "job_rows_per_s": round(args.rows / best_job, 1),
                "job_over_encode": round(best_encode / best_job, 3),
                "tokens": summary.tokens, "padding": round(summary.padding, 4),
                "max_abs_diff_vs_encode": float(np.abs(ds.embeddings - emb).max())}
            print(json.dumps({"rate": report["rate"]}), flush=True)
            shutil.rmtree(out)
            del emb, ds, body

        full = None
        if not skip >= {"memory", "resume"}:
            # A first process fills the compilation cache: the measured ones compile nothing.
            warm = os.path.join(work, "warm")
            wall, peak, line = run_peak(cli(model_dir, corpus, warm, args.shard_rows, cache),
                                        cache)
            report["warm_up"] = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak / 1024, 1),
                                 "summary": line}
            print(json.dumps({"warm_up": report["warm_up"]}), flush=True)
            shutil.rmtree(warm)
        if "memory" not in skip:
            rows = []
            for n in (args.rows,) if "big" in skip else (args.rows, args.big_rows):
                src = corpus if n == args.rows else os.path.join(work, f"corpus-{n}")
                if n != args.rows:
                    write_corpus(src, pool, n)
                out = os.path.join(work, f"mem-{n}")
                wall, peak, line = run_peak(cli(model_dir, src, out, args.shard_rows, cache),
                                            cache)
                full = wall if n == args.rows else full
                rows.append({"rows": n, "peak_rss_mb": round(peak / 1024, 1),
                             "wall_s": round(wall, 1), "rows_per_s": round(n / wall, 1),
                             "summary": line})
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out)
                if src != corpus:
                    shutil.rmtree(src)
            report["memory"] = rows
            if len(rows) == 2:
                report["big_over_small_peak"] = round(rows[1]["peak_rss_mb"] /
                                                      rows[0]["peak_rss_mb"], 3)

        if "resume" not in skip:
            out = os.path.join(work, "resume")
            cmd = cli(model_dir, corpus, out, args.shard_rows, cache)
            if full is None:
                start = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                full = time.perf_counter() - start
                shutil.rmtree(out)
            start = time.perf_counter()
            child = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
            while True:
                finished, total = done_shards(out)
                if finished >= total / 2 or child.poll() is not None:
                    break
                time.sleep(0.01)
            killed_s = time.perf_counter() - start
            child.send_signal(signal.SIGKILL)
            child.wait()
            at_kill = done_shards(out)[0]
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            resume = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            report["resume"] = {"full_run_s": round(full, 2), "killed_after_s": round(killed_s, 2),
                                "shards_done_at_kill": at_kill, "shards": total,
                                "resume_s": round(resume, 2),
                                "resume_over_full": round(resume / full, 3),
                                "summary": done.stderr.strip().splitlines()[-1]}
            print(json.dumps({"resume": report["resume"]}), flush=True)
        report["peak_rss_this_process_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
