"""encode() on a realistic length mix: first-call (compile) time and steady throughput.

    python benchmarks/encode_throughput.py [--layers 6] [--texts 512] [--checkpoint DIR]

Uses a random-weight release-format checkpoint at the released widths (written once to
--checkpoint if missing). Prints one JSON line.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

from convert.random_checkpoint import write_random_release
from jina_jax import JinaConfig, JinaEmbeddingsV3

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there one all we their been has when who will "
         "more no if out so said what up its about into than them can only other new some could "
         "time these two may then do first any my now such like our over man me even most made "
         "after also did many before must through back years where much your way well down "
         "retrieval embedding multilingual transformer rotary adapter passage query").split()


def corpus(n: int, seed: int = 0):
    """Word counts log-normal around 40 (a few up to ~1,000): short queries to long passages."""
    rng = np.random.default_rng(seed)
    counts = np.clip(rng.lognormal(np.log(40), 1.0, size=n).astype(int), 1, 1500)
    return [" ".join(rng.choice(WORDS, size=c)) for c in counts]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--checkpoint", default=None)
    args = p.parse_args()
    folder = args.checkpoint or os.path.join(tempfile.gettempdir(), f"jina-random-{args.layers}")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        write_random_release(folder, JinaConfig(num_hidden_layers=args.layers))
    model = JinaEmbeddingsV3.from_pretrained(folder, dtype=args.dtype)
    texts = corpus(args.texts)
    tok = model.tokenizer
    tok.enable_truncation(8192)
    prompt = model.config.instruction("retrieval.passage")
    tokens = sum(len(e.ids) for e in tok.encode_batch([prompt + t for t in texts]))

    def timed():
        start = time.perf_counter()
        model.encode(texts, task="retrieval.passage", batch_size=args.batch_size,
                     show_progress_bar=False)
        return time.perf_counter() - start

    first = timed()
    compiles = model.compile_count
    steady = min(timed() for _ in range(2))
    print(json.dumps({
        "layers": args.layers, "dtype": args.dtype, "texts": len(texts), "tokens": tokens,
        "first_call_s": round(first, 2), "compiles": compiles,
        "steady_s": round(steady, 2), "texts_per_s": round(len(texts) / steady, 1),
        "tokens_per_s": round(tokens / steady, 1),
        "compile_overhead_s": round(first - steady, 2),
    }))


if __name__ == "__main__":
    main()
