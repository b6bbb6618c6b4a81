"""Late chunking of one long document: wall time and whole-process peak RSS.

    python benchmarks/late_chunking.py [--layers 6] [--tokens 20000] [--max-length 8192]

A random release-format checkpoint at the released widths (`--layers` deep) and one document of
about `--tokens` tokens (sentences of random words), cut into windows of `--max-length` tokens;
prints windows, chunks, first-call and second-call seconds, tokens/s and peak RSS (loading
included) as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np

from convert.random_checkpoint import write_random_release
from jina_jax import JinaConfig, JinaEmbeddingsV3
from jina_jax.late_chunking import windows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--max-length", type=int, default=8192)
    args = p.parse_args()
    folder = os.path.join(tempfile.gettempdir(), f"jina-random-{args.layers}")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        write_random_release(folder, JinaConfig(num_hidden_layers=args.layers))
    model = JinaEmbeddingsV3.from_pretrained(folder)
    rng = np.random.default_rng(0)
    words = "the of and to in is that for it as was with be by on retrieval embedding".split()
    sentences, n = [], 0
    tok = model.tokenizer
    while n < args.tokens:
        sentence = " ".join(rng.choice(words, size=rng.integers(5, 30))).capitalize() + ". "
        sentences.append(sentence)
        n += len(tok.encode(sentence, add_special_tokens=False).ids)
    doc = "".join(sentences)
    tok.no_truncation()
    n_tokens = len(tok.encode(doc).ids)
    head = 1 + len(tok.encode(model.config.instruction("retrieval.passage"),
                              add_special_tokens=False).ids)
    capacity = args.max_length - head - 1
    n_windows = len(windows(n_tokens - head - 1, capacity, min(512, capacity // 4)))

    def timed():
        start = time.perf_counter()
        emb, spans = model.encode_late_chunks(doc, max_length=args.max_length)
        return emb, spans, time.perf_counter() - start

    emb, spans, first = timed()
    _, _, second = timed()
    print(json.dumps({
        "layers": args.layers, "document_tokens": n_tokens, "max_length": args.max_length,
        "windows": n_windows,
        "chunks": len(spans), "embedding_shape": list(emb.shape),
        "first_call_s": round(first, 1), "second_call_s": round(second, 1),
        "tokens_per_s": round(n_tokens / second, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
    }))


if __name__ == "__main__":
    main()
