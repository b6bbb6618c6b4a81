"""One long text through the model: tokens/s and the whole process's peak RSS (loading included).

    python benchmarks/long_context.py CHECKPOINT [--length 8192] [--task retrieval.passage]

CHECKPOINT: e.g. `jina-jax random-checkpoint /tmp/full24` (released widths, 24 layers).
Run it once per task setting: peak RSS is per process.
"""

import argparse
import json
import resource
import time

import numpy as np

from jina_jax import JinaEmbeddingsV3


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--task", default=None)
    args = p.parse_args()
    model = JinaEmbeddingsV3.from_pretrained(args.checkpoint)
    ids = np.random.default_rng(0).integers(5, 1000, (1, args.length)).astype(np.int32)
    lengths = [args.length]
    start = time.perf_counter()
    model.pooled(ids, lengths, args.task).block_until_ready()
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.pooled(ids, lengths, args.task).block_until_ready()
    steady = time.perf_counter() - start
    print(json.dumps({"length": args.length, "task": args.task, "first_call_s": round(first, 1),
                      "tok_s": round(args.length / steady, 1),
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))


if __name__ == "__main__":
    main()
