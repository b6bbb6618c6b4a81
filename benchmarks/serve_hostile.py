"""`jina-jax serve` against the hostile requests of issue 23: memory and worker time.

    python benchmarks/serve_hostile.py --model /tmp/r2 [--max-length 256] [--texts 2048]
                                       [--chars 65536] [--no-cut-texts 256]
                                       [--max-batch-tokens 8192]

`--model`: e.g. `jina-jax random-checkpoint /tmp/r2 --layers 2` (released widths). The server
runs in its own process (`--port 0`, stopped with SIGTERM); its memory is read from /proc
(peak: VmHWM, reset with clear_refs before each phase). Each hostile client leaves once its
request has reached the model (its first forward ran), as an attacker would: the forwards of
2048 x 256 tokens are legitimate work, not the issue. JSON lines:
0. round: one ordinary full round (`--max-batch-tokens` / max_length texts of 8 x max_length
   characters), run twice: seconds and peak RSS growth of the second. The forward's working
   memory is taken from the system and given back every round (0.72 GB for 32 x 256 at the
   released widths), so each phase's peak growth below includes it once: what a request adds
   is its growth minus this one's (or run with --max-batch-tokens 256: one-text rounds).
1. big: one request of `--texts` texts x `--chars` characters of words (inside every limit):
   seconds from sending to its first forward done (receiving, parsing, tokenizing, one
   round), the peak RSS over the RSS before, seconds from leaving until its texts are
   counted cancelled.
2. no-space: the same for `--no-cut-texts` texts of random letters without a space (pieces
   cross every position: a window of prefixes decides them, see tokenize.py).
3. no-cut: the same for `--no-cut-texts` texts of one repeated letter (their tokens depend on
   their length: tokenized whole).
4. late: a late-chunking document of 4 texts x 16,000 characters, the same; then a short late
   request answered; compiles while serving (should be 0).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import threading
import time

from jina_jax.metrics import parse

WORDS = "the quick brown fox jumps over a lazy dog while rain falls on green hills".split()


def text(i: int, chars: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(chars // 3))[:chars]


def status_field(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def start(args):
    proc = subprocess.Popen(
        [shutil.which("jina-jax"), "serve", "--model", args.model, "--port", "0",
         "--max-length", str(args.max_length), "--max-batch-tokens",
         str(args.max_batch_tokens), "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True)
    while (match := re.search(r"http://127\.0\.0\.1:(\d+)", proc.stderr.readline())) is None:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
    port = int(match.group(1))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        try:
            status, body = get(port, "/health")
            if status == 200 and "background_warm_up" not in body:  # every shape compiled
                return proc, port
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready")


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read().decode()


def post(port, body: bytes):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1200)
    conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def metrics(port) -> dict:
    return parse(get(port, "/metrics")[1])


def leave_after_first_forward(port, pid, body: bytes, late: bool = False) -> dict:
    """Sends `body`, leaves once its first forward ran; the phase's numbers. The queue depth
    tells the steps apart: it reaches the request's texts once the body is parsed (queued),
    and drops below that when the worker, done tokenizing, takes the first round (what holds
    the worker before the model: tokenize_s)."""
    # The worker idle first: a previous client's last round may still run after it left (a
    # one-word request is answered after it).
    post(port, json.dumps({"input": "idle"}).encode())
    before = metrics(port)
    n = len(json.loads(body)["input"])
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    rss = status_field(pid, "VmRSS")
    with socket.create_connection(("127.0.0.1", port), 60) as s:
        sent = time.perf_counter()
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        queued = taken = None
        while (now := metrics(port))["jina_jax_batches_total"] == before["jina_jax_batches_total"]:
            depth = now["jina_jax_queue_depth"]
            if queued is None and depth >= n:
                queued = time.perf_counter() - sent
            if queued is not None and taken is None and depth < n:
                taken = time.perf_counter() - sent
            time.sleep(0.02)
        first = time.perf_counter() - sent
        taken = first if taken is None else taken
    left = time.perf_counter()
    # Until no text of it waits: each one not taken into a round is counted cancelled before
    # the queue depth lets go of it (none, if all were taken before it left). A late-chunking
    # document leaves the queue when it starts: its cancel comes after the forward running.
    while (now := metrics(port))["jina_jax_queue_depth"] > 0 or (
            late and now["jina_jax_cancelled_texts_total"]
            == before["jina_jax_cancelled_texts_total"]):
        time.sleep(0.02)
    return {"texts": n, "body_mb": round(len(body) / 1e6, 1),
            "to_queued_s": None if queued is None else round(queued, 2),
            "tokenize_s": None if queued is None else round(taken - queued, 2),
            "to_first_forward_done_s": round(first, 2),
            "cancelled_after_leaving_s": round(time.perf_counter() - left, 2),
            "cancelled_texts": now["jina_jax_cancelled_texts_total"]
            - before["jina_jax_cancelled_texts_total"],
            "rss_before_gb": round(rss / 1e9, 2),
            "peak_growth_gb": round((status_field(pid, "VmHWM") - rss) / 1e9, 3),
            "rss_after_gb": round(status_field(pid, "VmRSS") / 1e9, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--texts", type=int, default=2048)
    p.add_argument("--chars", type=int, default=65536)
    p.add_argument("--no-cut-texts", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    args = p.parse_args()
    proc, port = start(args)
    try:
        rows = max(1, args.max_batch_tokens // args.max_length)
        ordinary = json.dumps({"input": [text(i, 8 * args.max_length) for i in range(rows)]})
        post(port, ordinary.encode())
        with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
            f.write("5")
        rss, started = status_field(proc.pid, "VmRSS"), time.perf_counter()
        post(port, ordinary.encode())
        print(json.dumps({"phase": "round", "texts": rows,
                          "seconds": round(time.perf_counter() - started, 2),
                          "peak_growth_gb": round((status_field(proc.pid, "VmHWM") - rss) / 1e9,
                                                  3)}), flush=True)
        compiles = metrics(port)["jina_jax_compiles"]
        body = json.dumps({"input": [text(i, args.chars) for i in range(args.texts)]}).encode()
        print(json.dumps({"phase": "big", "chars": args.chars,
                          **leave_after_first_forward(port, proc.pid, body)}), flush=True)
        rng = random.Random(0)
        letters = ["".join(rng.choices(string.ascii_lowercase, k=args.chars))
                   for _ in range(args.no_cut_texts)]
        body = json.dumps({"input": letters}).encode()
        del letters
        print(json.dumps({"phase": "no-space", "chars": args.chars,
                          **leave_after_first_forward(port, proc.pid, body)}), flush=True)
        body = json.dumps({"input": ["a" * args.chars] * args.no_cut_texts}).encode()
        print(json.dumps({"phase": "no-cut", "chars": args.chars,
                          **leave_after_first_forward(port, proc.pid, body)}), flush=True)
        body = json.dumps({"input": [text(i, 16000) for i in range(4)],
                           "late_chunking": True}).encode()
        late = leave_after_first_forward(port, proc.pid, body, late=True)
        status, _ = post(port, json.dumps({"input": [text(1, 2000), text(2, 900)],
                                           "late_chunking": True}).encode())
        print(json.dumps({"phase": "late", **late, "short_late_status": status,
                          "compiles_while_serving": metrics(port)["jina_jax_compiles"]
                          - compiles}), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
