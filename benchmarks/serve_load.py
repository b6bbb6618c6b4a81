"""`jina-jax serve` under load, against the same texts sent one at a time and against `encode()`.

    python benchmarks/serve_load.py [--layers 6] [--hidden 1024] [--clients 16] [--seconds 20]
                                    [--model FOLDER] [--max-length 512] [--restart-only]
                                    [--ready-only] [--serve-only] [--warm-up-threads N]

To compare with another version of the server, run this script with PYTHONPATH pointing at
that version's tree (it drives `jina-jax serve` over HTTP, whichever the path provides).

Model: `--model`, else a random release-format checkpoint (`--layers` deep, `--hidden` wide,
five task adapters) written to a temporary folder. The server runs in its own process (`jina-jax
serve --port 0`, started by this script, stopped with SIGTERM); the clients are threads of this
process, each with its own keep-alive HTTP connection. Both share this machine's cores, so the
phases run one after another, never side by side.

Texts: a realistic mix for a search service: 70% queries (3-20 words), 30% passages (30-200
words), each with a task drawn from the five adapters and no adapter.

The compilation cache is a fresh folder of the run (`JINA_JAX_COMPILATION_CACHE`), so the first
start compiles every shape; a second start (`start` line, `restart_ready_s`) loads them.
`ready_s`: until `/health` says 200 (the server answers; a server that compiles the long shapes
in the background is then still doing so); `all_shapes_s`: until that background warm-up is done
too. The load phases start after it, so they measure serving, not compiling.

Phases (each prints a JSON line):
1. load: `--clients` clients send single-text requests back to back for `--seconds`: texts/s,
   tokens/s (usage.prompt_tokens), latency p50/p95/p99, texts per forward batch.
2. sequential: one client, one text at a time, for `--seconds`: texts/s and latency.
3. burst: the same 48 single-text requests (mixed tasks) all at once, then one after another:
   wall times and their ratio; once with the load's mix, once with queries only.
4. encode: after the server stopped, `encode()` in this process on the texts phase 1 sent
   (their tasks per text, one call; timed on its second call, the first compiles): texts/s,
   and the server's load rate as a fraction of it; then each burst's 48 texts through an
   in-process `Batcher` with the server's settings, all at once vs one after another: what
   batching gives this model on this machine without HTTP (the burst's ceiling).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from convert.random_checkpoint import write_random_release
from jina_jax import JinaConfig, JinaEmbeddingsV3
from jina_jax.batcher import Batcher
from jina_jax.metrics import parse

TASKS = ("retrieval.query", "retrieval.passage", "separation", "classification",
         "text-matching", None)
WORDS = ("the of and to in is that for it as was with be by on not this are or from at which "
         "but have an they you were one all we their been has when who will more if out so "
         "what up about into than them can only other new some could time these two may then "
         "retrieval embedding multilingual transformer rotary adapter passage query").split()


# The 48-request bursts: the load's mix, and queries only.
BURSTS = {"mixed": 0.7, "queries": 1.0}


def workload(n: int, seed: int, queries: float = 0.7) -> list[tuple[str, str | None]]:
    """`n` (text, task): a fraction `queries` of 3-20 words, the rest passages of 30-200."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = rng.integers(3, 21) if rng.random() < queries else rng.integers(30, 201)
        out.append((" ".join(rng.choice(WORDS, size=words)), TASKS[rng.integers(len(TASKS))]))
    return out


class Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def embed(self, text, task) -> tuple[float, int]:
        """(latency seconds, prompt tokens) of one single-text request."""
        body = json.dumps({"input": text, "task": task, "model": "jina-embeddings-v3"})
        start = time.perf_counter()
        self.conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        latency = time.perf_counter() - start
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}: {data[:500]!r}")
        return latency, json.loads(data)["usage"]["prompt_tokens"]

    def get(self, path) -> tuple[int, str]:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        return response.status, response.read().decode()


def start_server(model: str, args) -> tuple[subprocess.Popen, int, float, float]:
    """(process, port, seconds to /health 200, seconds until the background warm-up is done
    too: the same where the server has none)."""
    exe = shutil.which("jina-jax") or "jina-jax"
    cmd = [exe, "serve", "--model", model, "--port", "0", "--log-level", "warning",
           "--max-length", str(args.max_length), "--max-batch-tokens", str(args.max_batch_tokens),
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    if args.warm_up_threads is not None:  # a server from before the flag has none
        cmd += ["--warm-up-threads", str(args.warm_up_threads)]
    started = time.perf_counter()
    env = dict(os.environ, JINA_JAX_COMPILATION_CACHE=args.cache)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stderr.readline()
    match = re.search(r":(\d+) ", first)
    if not match:
        raise SystemExit(f"no address from the server: {first}")
    threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stderr],
                     daemon=True).start()
    port = int(match.group(1))
    deadline = time.monotonic() + 1800
    ready = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            status, body = Client(port).get("/health")
            if status == 200 and ready is None:
                ready = time.perf_counter() - started
            if status == 200 and (args.ready_only
                                  or "background_warm_up" not in json.loads(body)):
                return proc, port, ready, time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server was not ready in 30 minutes")


def percentiles(latencies) -> dict:
    p = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return {"p50_ms": round(p[0], 1), "p95_ms": round(p[1], 1), "p99_ms": round(p[2], 1)}


def batch_stats(port) -> tuple[float, float]:
    m = parse(Client(port).get("/metrics")[1])
    return m["jina_jax_batch_rows_sum"], m["jina_jax_batch_rows_count"]


def load_phase(port, texts, clients, seconds):
    """Clients send back to back from a shared list until `seconds` pass."""
    lock, position, results = threading.Lock(), [0], []
    stop = time.perf_counter() + seconds

    def client():
        c, mine = Client(port), []
        while time.perf_counter() < stop:
            with lock:
                i = position[0]
                position[0] += 1
            latency, tokens = c.embed(*texts[i % len(texts)])
            mine.append((i, latency, tokens))
        return mine

    rows0, batches0 = batch_stats(port)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for part in pool.map(lambda _: client(), range(clients)):
            results += part
    wall = time.perf_counter() - start
    rows1, batches1 = batch_stats(port)
    latencies = [r[1] for r in results]
    return {"texts": len(results), "wall_s": round(wall, 2),
            "texts_per_s": round(len(results) / wall, 2),
            "tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
            "texts_per_batch": round((rows1 - rows0) / max(batches1 - batches0, 1), 2),
            **percentiles(latencies)}, sorted(r[0] for r in results)


def burst_phase(port, texts):
    """48 requests at once vs the same 48 one after another."""
    barrier = threading.Barrier(len(texts))

    def one(item):
        c = Client(port)
        barrier.wait(60)
        return c.embed(*item)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        list(pool.map(one, texts))
    together = time.perf_counter() - start
    c = Client(port)
    start = time.perf_counter()
    for item in texts:
        c.embed(*item)
    apart = time.perf_counter() - start
    return {"requests": len(texts), "concurrent_s": round(together, 3),
            "sequential_s": round(apart, 3), "speedup": round(apart / together, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--warm-up-threads", type=int, default=None,
                   help="the server's --warm-up-threads (default: its own default)")
    p.add_argument("--restart-only", action="store_true",
                   help="only start, stop and start the server again (readiness times)")
    p.add_argument("--ready-only", action="store_true",
                   help="with --restart-only: stop each start at /health 200, without waiting "
                        "for a background warm-up (all_shapes_s is then ready_s)")
    p.add_argument("--serve-only", action="store_true",
                   help="skip phase 4 (encode() and the in-process batcher after the server)")
    args = p.parse_args()
    texts = workload(4096, seed=0)
    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model
        if model_dir is None:
            model_dir = os.path.join(work, "model")
            heads = max(1, args.hidden // 64)
            cfg = JinaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                             num_attention_heads=heads, intermediate_size=4 * args.hidden)
            write_random_release(model_dir, cfg, dtype="float32")
        args.cache = os.path.join(work, "xla")
        proc, port, ready_s, warmed_s = start_server(model_dir, args)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        proc, port, again_s, rewarmed_s = start_server(model_dir, args)
        print(json.dumps({"phase": "start", "ready_s": round(ready_s, 1),
                          "all_shapes_s": round(warmed_s, 1),
                          "restart_ready_s": round(again_s, 1),
                          "restart_all_shapes_s": round(rewarmed_s, 1), "layers": args.layers,
                          "hidden": args.hidden, "max_length": args.max_length}), flush=True)
        if args.restart_only:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            return
        try:
            load, sent = load_phase(port, texts, args.clients, args.seconds)
            print(json.dumps({"phase": "load", "clients": args.clients, **load}), flush=True)
            seq, _ = load_phase(port, texts, 1, args.seconds)
            print(json.dumps({"phase": "sequential", **seq,
                              "load_vs_sequential": round(load["texts_per_s"]
                                                          / seq["texts_per_s"], 2)}), flush=True)
            for mix, share in BURSTS.items():
                burst = burst_phase(port, workload(48, seed=1, queries=share))
                print(json.dumps({"phase": "burst", "mix": mix, **burst}), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
        if args.serve_only:
            return
        model = JinaEmbeddingsV3.from_pretrained(model_dir)
        chosen = [texts[i % len(texts)] for i in sent]
        words, tasks = [t for t, _ in chosen], [k for _, k in chosen]
        model.encode(words, task=tasks, max_length=args.max_length)  # compiles its shapes
        start = time.perf_counter()
        model.encode(words, task=tasks, max_length=args.max_length)
        wall = time.perf_counter() - start
        rate = len(words) / wall
        print(json.dumps({"phase": "encode", "texts": len(words), "wall_s": round(wall, 2),
                          "texts_per_s": round(rate, 2),
                          "server_load_vs_encode": round(load["texts_per_s"] / rate, 2),
                          "server_exit_code": code}), flush=True)
        # Each burst's ceiling on this machine, HTTP aside: its 48 texts through an in-process
        # batcher with the server's settings, all submitted at once vs one after another (each
        # timed after a first pass that compiles the shapes it needs).
        batcher = Batcher(model, max_batch_tokens=args.max_batch_tokens,
                          max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                          max_length=args.max_length).start()
        dim = model.config.hidden_size

        def together(items):
            jobs = [batcher.submit([t], [k], dim) for t, k in items]
            return [j.future.result() for j in jobs]

        def alone(items):
            return [batcher.submit([t], [k], dim).future.result() for t, k in items]

        for mix, share in BURSTS.items():
            items = [(t, None if k is None else model.resolve_task(k))
                     for t, k in workload(48, seed=1, queries=share)]
            seconds = []
            for run in (together, alone):
                run(items)
                start = time.perf_counter()
                run(items)
                seconds.append(time.perf_counter() - start)
            print(json.dumps({"phase": "burst ceiling", "mix": mix,
                              "batcher_together_s": round(seconds[0], 3),
                              "batcher_alone_s": round(seconds[1], 3),
                              "ceiling": round(seconds[1] / seconds[0], 2)}), flush=True)
        batcher.close()

if __name__ == "__main__":
    main()
