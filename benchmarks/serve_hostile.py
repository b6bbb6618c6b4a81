"""`jina-jax serve` against the hostile requests of issue 23: memory and worker time.

    python benchmarks/serve_hostile.py --model /tmp/r2 [--max-length 256] [--texts 2048]
                                       [--chars 65536] [--no-cut-texts 256]

`--model`: e.g. `jina-jax random-checkpoint /tmp/r2 --layers 2` (released widths). The server
runs in its own process (`--port 0`, stopped with SIGTERM); its memory is read from /proc
(peak: VmHWM after resetting it with clear_refs). A probe client sends a one-text request every
0.25 s throughout each phase: its slowest answer is how long the worker was held. JSON lines:
1. big: one request of `--texts` texts x `--chars` characters of words (inside every limit):
   wall time, peak RSS growth over the RSS before, RSS after, slowest probe.
2. leave: the same request, its client gone as soon as the server has queued it: seconds until
   the texts are counted cancelled, slowest probe.
3. no-cut: `--no-cut-texts` texts of one repeated letter (no provably safe cut for the random
   checkpoint's tokenizer: tokenized whole): wall time and per text.
4. late: a late-chunking document of 4 texts x 16,000 characters: wall time; then the same
   with the client gone after the first forward: seconds until counted cancelled; compiles
   while serving (should be 0).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
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
        [sys.executable, "-m", "jina_jax", "serve", "--model", args.model, "--port", "0",
         "--max-length", str(args.max_length), "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)", first).group(1))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        try:
            if get(port, "/health")[0] == 200:
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


class Probe:
    """One-text requests every 0.25 s; `slowest` is the longest wait for an answer."""

    def __init__(self, port):
        self.port, self.slowest, self.stop = port, 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        body = json.dumps({"input": "probe"}).encode()
        while not self.stop.is_set():
            started = time.perf_counter()
            post(self.port, body)
            self.slowest = max(self.slowest, time.perf_counter() - started)
            self.stop.wait(0.25)

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return round(self.slowest, 2)


def leave_after(port, body: bytes, ready) -> float:
    """Sends `body`, leaves once `ready(metrics)`; seconds until its texts count cancelled."""
    before = metrics(port)["jina_jax_cancelled_texts_total"]
    n = len(json.loads(body)["input"])
    with socket.create_connection(("127.0.0.1", port), 60) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        while not ready(metrics(port)):
            time.sleep(0.02)
    left = time.perf_counter()
    while metrics(port)["jina_jax_cancelled_texts_total"] < before + n:
        time.sleep(0.02)
    return round(time.perf_counter() - left, 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--texts", type=int, default=2048)
    p.add_argument("--chars", type=int, default=65536)
    p.add_argument("--no-cut-texts", type=int, default=256)
    args = p.parse_args()
    proc, port = start(args)
    pid = proc.pid
    try:
        compiles = metrics(port)["jina_jax_compiles"]
        body = json.dumps({"input": [text(i, args.chars) for i in range(args.texts)]}).encode()
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        before = status_field(pid, "VmRSS")
        probe = Probe(port)
        started = time.perf_counter()
        status, _ = post(port, body)
        wall = time.perf_counter() - started
        print(json.dumps({"phase": "big", "texts": args.texts, "chars": args.chars,
                          "body_mb": round(len(body) / 1e6, 1), "status": status,
                          "wall_s": round(wall, 2), "rss_before_gb": round(before / 1e9, 2),
                          "peak_growth_gb": round((status_field(pid, "VmHWM") - before) / 1e9,
                                                  3),
                          "rss_after_gb": round(status_field(pid, "VmRSS") / 1e9, 2),
                          "slowest_probe_s": probe.done()}), flush=True)

        probe = Probe(port)
        seconds = leave_after(port, body,
                              lambda m: m["jina_jax_queue_depth"] >= args.texts)
        print(json.dumps({"phase": "leave", "cancelled_after_s": seconds,
                          "slowest_probe_s": probe.done()}), flush=True)
        del body

        body = json.dumps({"input": ["a" * args.chars] * args.no_cut_texts}).encode()
        started = time.perf_counter()
        status, _ = post(port, body)
        wall = time.perf_counter() - started
        print(json.dumps({"phase": "no-cut", "texts": args.no_cut_texts, "status": status,
                          "wall_s": round(wall, 2),
                          "per_text_ms": round(1000 * wall / args.no_cut_texts, 1)}), flush=True)

        late = json.dumps({"input": [text(i, 16000) for i in range(4)],
                           "late_chunking": True}).encode()
        started = time.perf_counter()
        status, _ = post(port, late)
        wall = time.perf_counter() - started
        batches = metrics(port)["jina_jax_batches_total"]
        seconds = leave_after(port, late, lambda m: m["jina_jax_batches_total"] > batches)
        print(json.dumps({"phase": "late", "status": status, "wall_s": round(wall, 2),
                          "cancelled_after_s": seconds,
                          "compiles_while_serving": metrics(port)["jina_jax_compiles"]
                          - compiles}), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
