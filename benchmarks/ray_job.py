"""The corpus job on Ray against the local corpus job, side by side in one run: what the engine
costs (Ray with 1 actor vs `embed_corpus` in this process), and 2 actors vs 1.

    python benchmarks/ray_job.py [--rows 32768] [--shard-rows 4096] [--rounds 2]
    python benchmarks/ray_job.py --address auto --actors 1,8 --num-gpus 1 --model /models/jina-v3

Model: a random checkpoint with small widths (hidden 64, 1 layer, vocab 32000; or `--model`),
so what is measured is the job's cost around the model. Corpus: `--rows` rows of short and
long texts (lognormal word counts, ids "doc-<i>") in 4 Parquet files. Contenders, each round
in this order, best round of each reported:
  local       `embed_corpus` in this process (Parquet in, shards + manifest out)
  ray-N       `embed_corpus_ray` with N actors: the same shards as Ray tasks, same folder layout
  dataset-1   Ray Data's own pipeline: `read_parquet` -> `embed_dataset` (1 actor) ->
              `write_parquet`
A warm-up run of each fills the compilation cache first (shared by the actors through
$JINA_JAX_COMPILATION_CACHE), so no round compiles; every Ray round starts its actors afresh
(model load included: that is part of what the engine costs). Without --address, a local
cluster of `--num-cpus` CPUs (default: all) is started and stopped here. Every dataset is
checked equal to the local job's (1e-6) by id.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from convert.random_checkpoint import write_random_release
from jina_jax import (CorpusJob, JinaConfig, JinaEmbeddingsV3, embed_corpus, embed_corpus_ray,
                      embed_dataset, open_dataset)
from jina_jax.data.schema import embedding_matrix

TASK = "retrieval.passage"


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the of and to in is that for it as was with be by on retrieval embedding".split()
    counts = np.clip(rng.lognormal(np.log(10), 1.0, n).astype(int), 1, 1000)
    return [" ".join(rng.choice(words, size=c)) for c in counts]


def write_corpus(folder: str, rows: int, files: int = 4) -> None:
    os.makedirs(folder)
    body, per = texts(rows), -(-rows // files)
    for f in range(files):
        lo, hi = f * per, min(rows, (f + 1) * per)
        pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(lo, hi)], "text": body[lo:hi]}),
                       os.path.join(folder, f"{f}.parquet"), row_group_size=4096)


def by_id(ids, matrix) -> dict:
    return dict(zip(ids, matrix))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--shard-rows", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--actors", default="1,2", help="actor counts of the ray-N contenders")
    p.add_argument("--model", help="a checkpoint (default: a tiny random one)")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=int, default=None, help="the local cluster's CPUs")
    p.add_argument("--num-gpus", type=float, default=None, help="per actor")
    p.add_argument("--batch-rows", type=int, default=1024, help="dataset-1's rows per batch")
    p.add_argument("--skip-dataset", action="store_true", help="no dataset-1 contender")
    args = p.parse_args()
    actor_counts = [int(a) for a in args.actors.split(",")]
    work = tempfile.mkdtemp(prefix="jina-ray-bench-")
    os.environ.setdefault("JINA_JAX_COMPILATION_CACHE", os.path.join(work, "xla-cache"))
    try:
        model_dir = args.model or os.path.join(work, "tiny")
        if args.model is None:
            write_random_release(model_dir, JinaConfig(vocab_size=32000, hidden_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=128), dtype="float32")
        corpus = os.path.join(work, "corpus")
        write_corpus(corpus, args.rows)
        model = JinaEmbeddingsV3.from_pretrained(model_dir)
        job = CorpusJob(inputs=(corpus,), task=TASK, id_field="id", shard_rows=args.shard_rows)
        start = time.perf_counter()
        ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        init_s = time.perf_counter() - start

        def local(out):
            return embed_corpus(model, job, out, overwrite=True, progress=False, log=None)

        def ray_job(n):
            return lambda out: embed_corpus_ray(model, job, out, overwrite=True, actors=n,
                                                num_gpus=args.num_gpus, log=None)

        def dataset(out):
            shutil.rmtree(out, ignore_errors=True)
            ds = embed_dataset(ray.data.read_parquet(corpus), model_dir, task=TASK, actors=1,
                               num_gpus=args.num_gpus, batch_rows=args.batch_rows)
            ds.write_parquet(out)

        contenders = {"local": local, **{f"ray-{n}": ray_job(n) for n in actor_counts}}
        if not args.skip_dataset:
            contenders["dataset-1"] = dataset
        outs = {name: os.path.join(work, name) for name in contenders}
        for name, run in contenders.items():  # warm-up: fills the compilation cache
            run(outs[name])
        times = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, run in contenders.items():
                start = time.perf_counter()
                run(outs[name])
                times[name].append(round(time.perf_counter() - start, 2))
                print(json.dumps({name: times[name][-1]}), flush=True)

        reference = open_dataset(outs["local"])
        want = by_id(reference.ids.to_pylist(), reference.embeddings)
        diffs = {}
        for name in contenders:
            if name == "dataset-1":
                table = pq.read_table(outs[name])
                got = by_id(table.column("id").to_pylist(), embedding_matrix(table.column(
                    "embedding")))
            else:
                ds = open_dataset(outs[name], verify=True)
                got = by_id(ds.ids.to_pylist(), ds.embeddings)
            assert got.keys() == want.keys() and len(got) == args.rows, name
            diffs[name] = float(max(np.abs(got[k] - want[k]).max() for k in want))
        best = {name: min(t) for name, t in times.items()}
        rate = {name: round(args.rows / t, 1) for name, t in best.items()}
        report = {"rows": args.rows, "shard_rows": args.shard_rows,
                  "cluster_cpus": ray.cluster_resources().get("CPU"),
                  "ray_init_s": round(init_s, 2), "rounds_s": times, "rows_per_s": rate,
                  "max_abs_diff_vs_local": diffs,
                  "ray_1_over_local": round(rate["ray-1"] / rate["local"], 3)
                  if "ray-1" in rate else None}
        if "ray-1" in rate:
            report.update({f"ray_{n}_over_ray_1": round(rate[f"ray-{n}"] / rate["ray-1"], 3)
                           for n in actor_counts if n != 1})
        if "dataset-1" in rate:
            report["dataset_1_over_local"] = round(rate["dataset-1"] / rate["local"], 3)
        print(json.dumps(report))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
