"""The corpus job on Ray against the local corpus job, side by side in one run: what the engine
costs (Ray with 1 actor vs the local job), 2 actors vs 1, and where Ray's time goes.

    python benchmarks/ray_job.py [--rows 65536] [--shard-rows 4096] [--rounds 2]
    python benchmarks/ray_job.py --address auto --actors 1,8 --num-gpus 1 --model /models/jina-v3

Model: a random checkpoint with small widths (hidden 64, 1 layer, vocab 32000; or `--model`),
so what is measured is the job's cost around the model. Corpus: `--rows` rows of short and
long texts (lognormal word counts, ids "doc-<i>") in 4 Parquet files, `--shard-rows` a shard.

Like with like: every contender is a fresh `jina-jax embed` process on the same inputs, with the
compilation cache warm (a warm-up run of each first; the cache is shared with the actors
through $JINA_JAX_COMPILATION_CACHE), so each pays its own process start, imports and model
load, and none compiles:
  local       `jina-jax embed --output DIR/` (this machine, one process)
  ray-N       the same with `--engine ray --ray-address <the cluster> --ray-actors N`: the
              driver joins the running cluster (its start, `ray.init`, is reported apart) and
              N fresh actors load the model and write the shards
  dataset-1   (unless --skip-dataset) Ray Data's own read_parquet -> embed_dataset (1 actor)
              -> write_parquet, from this process
For each: the wall time, and the steady rate: the rows of the shards written after the first
ones over the time from the first shard's file to the last one's (file modification times;
the local job writes its shards a window of 16,384 rows at a time, so give it several
windows), i.e. the rate once start-up is over; start-up = wall - rows / steady rate. Then one
`embed_corpus_ray` run (1 actor) in this process with its timeline: actor process start and
imports, model load and check, each shard in the actor, and the driver's lag recording it.
A local cluster (no --address) gets `--num-cpus` CPUs and runs its workers at this process's
niceness (Ray's default is nice 15, which on a shared machine loses to everything else; the
local job runs at this process's). Every dataset is checked equal to the local job's by id.
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
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from convert.random_checkpoint import write_random_release
from jina_jax import (CorpusJob, JinaConfig, JinaEmbeddingsV3, embed_corpus_ray, embed_dataset,
                      open_dataset)
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


def steady(folder: str, start: float, wall: float) -> dict:
    """Rates from the shard files' modification times (each is renamed into place when done).
    The local job finishes its shards a window (16,384 rows) at a time, so the steady rate
    counts the rows of shards finished after the first moment any was (0.1 s apart or more)."""
    shards = []
    for name in os.listdir(folder):
        if name.startswith("part-") and name.endswith(".parquet"):
            path = os.path.join(folder, name)
            shards.append((os.stat(path).st_mtime, pq.ParquetFile(path).metadata.num_rows))
    shards.sort()
    rows, first, last = sum(n for _, n in shards), shards[0][0], shards[-1][0]
    later = sum(n for t, n in shards if t > first + 0.1)
    rate = later / (last - first) if later else None
    return {"wall_s": round(wall, 2), "rows_per_s": round(rows / wall, 1),
            "first_shard_s": round(first - start, 2),
            "steady_rows_per_s": None if rate is None else round(rate, 1),
            "startup_s": None if rate is None else round(wall - rows / rate, 2)}


def cli(args: list[str]) -> None:
    exe = shutil.which("jina-jax")
    assert exe, "the jina-jax console script is not installed (pip install -e .)"
    run = subprocess.run([exe, *args], capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]


def breakdown(timeline: list, start: float, end: float) -> dict:
    """Where one embed_corpus_ray run's time went (seconds from its start). A task embeds up
    to a window of consecutive shards in one stream, so its shards finish together: the rate
    in the actor counts the rows finished after the first moment any was (0.1 s apart)."""
    t = sorted(timeline, key=lambda e: e["finished"])
    first, last = t[0]["finished"], t[-1]["finished"]
    later = sum(e["rows"] for e in t if e["finished"] > first + 0.1)
    return {
        "wall_s": round(end - start, 2),
        "plan_and_submit_s": round(t[0]["submitted"] - start, 2),
        "actor_process_start_and_imports_s": round(t[0]["actor_created"] - t[0]["submitted"], 2),
        "model_load_and_check_s": round(t[0]["actor_ready"] - t[0]["actor_created"], 2),
        "first_task_s": round(first - t[0]["actor_ready"], 2),
        "first_task_rows": sum(e["rows"] for e in t if e["finished"] <= first + 0.1),
        "rows_per_s_in_actor_after_first_task": round(later / (last - first), 1)
        if later else None,
        "driver_record_lag_mean_s": round(float(np.mean([e["recorded"] - e["finished"]
                                                         for e in t])), 2),
        "after_last_shard_s": round(end - last, 2),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=65536)
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
        if args.address is None:  # the workers at our niceness, as the local job runs
            os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
        start = time.perf_counter()
        ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        init_s = time.perf_counter() - start
        address = ray.get_runtime_context().gcs_address
        embed = ["embed", "--model", model_dir, "--input", corpus, "--task", TASK,
                 "--id-field", "id", "--shard-rows", str(args.shard_rows), "--overwrite",
                 "--quiet"]

        def local(out):
            cli([*embed, "--output", out + "/"])

        def ray_job(n):
            gpus = [] if args.num_gpus is None else ["--ray-num-gpus", str(args.num_gpus)]
            return lambda out: cli([*embed, "--output", out + "/", "--engine", "ray",
                                    "--ray-address", address, "--ray-actors", str(n), *gpus])

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
        rounds = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, run in contenders.items():
                wall_start, start = time.time(), time.perf_counter()
                run(outs[name])
                wall = time.perf_counter() - start
                if name == "dataset-1":  # Ray Data names its files itself, no shard plan
                    rounds[name].append({"wall_s": round(wall, 2),
                                         "rows_per_s": round(args.rows / wall, 1)})
                else:
                    rounds[name].append(steady(outs[name], wall_start, wall))
                print(json.dumps({name: rounds[name][-1]}), flush=True)

        # one run of the Ray job in this process, with its timeline
        model = JinaEmbeddingsV3.from_pretrained(model_dir)
        job = CorpusJob(inputs=(corpus,), task=TASK, id_field="id", shard_rows=args.shard_rows)
        timeline, start = [], time.time()
        embed_corpus_ray(model, job, os.path.join(work, "timeline"), overwrite=True, actors=1,
                         num_gpus=args.num_gpus, log=None, timeline=timeline)
        where = breakdown(timeline, start, time.time())
        print(json.dumps({"ray-1 timeline": where}), flush=True)

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

        def best(name, key):
            values = [r[key] for r in rounds[name] if r.get(key) is not None]
            return max(values) if values else None

        def ratio(a, b, key):
            x, y = best(a, key), best(b, key)
            return None if x is None or y is None else round(x / y, 3)

        report = {"rows": args.rows, "shard_rows": args.shard_rows,
                  "cluster_cpus": ray.cluster_resources().get("CPU"),
                  "worker_niceness": os.environ.get("RAY_worker_niceness"),
                  "ray_init_s": round(init_s, 2), "rounds": rounds,
                  "max_abs_diff_vs_local": diffs, "load_average": os.getloadavg()}
        for key in ("rows_per_s", "steady_rows_per_s"):
            for n in actor_counts:
                report[f"ray_{n}_over_local_{key}"] = ratio(f"ray-{n}", "local", key)
                if n != 1 and 1 in actor_counts:
                    report[f"ray_{n}_over_ray_1_{key}"] = ratio(f"ray-{n}", "ray-1", key)
        if "dataset-1" in contenders:
            report["dataset_1_over_local_rows_per_s"] = ratio("dataset-1", "local", "rows_per_s")
        print(json.dumps(report))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
