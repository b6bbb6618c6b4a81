"""The `jina-jax` command line: `convert`, `embed`, `random-checkpoint`."""

from __future__ import annotations

import argparse
import json
import sys


def _embed_parser(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="hub id or checkpoint folder")
    p.add_argument("--task", required=True,
                   help="task adapter (e.g. retrieval.passage), or 'none' for no adapter")
    p.add_argument("--input", default="-", help="text file (one text per line) or JSONL; - = stdin")
    p.add_argument("--text-field", default=None,
                   help="read JSONL records and embed this field (default 'text' for .jsonl input)")
    p.add_argument("--output", default="-",
                   help="OUT.npy (float32 [N, D]) or OUT.jsonl (input records + 'embedding'); "
                        "- = JSONL on stdout")
    p.add_argument("--truncate-dim", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


class _UsageError(Exception):
    pass


def _read_input(path: str, text_field: str | None):
    """(texts, records): records are the JSONL objects, or None for plain text input."""
    try:
        data = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as e:
        raise _UsageError(f"cannot read input {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise _UsageError(f"input {path} is not UTF-8 text ({e.reason})") from None
    lines = data.splitlines()
    if text_field is None and not path.endswith(".jsonl"):
        return lines, None
    field = text_field or "text"
    texts, records = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _UsageError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise _UsageError(f"{path}, line {n}: no string field {field!r}")
        texts.append(record[field])
        records.append(record)
    return texts, records


def _write_output(path: str, emb, texts, records):
    import numpy as np

    if path.endswith(".npy"):
        np.save(path, emb)
        return
    if path != "-" and not path.endswith(".jsonl"):
        raise _UsageError(f"--output must end in .npy or .jsonl (or be -), got {path}")
    records = records if records is not None else [{"text": t} for t in texts]
    out = sys.stdout if path == "-" else open(path, "w", encoding="utf-8")
    try:
        for record, vector in zip(records, emb):
            out.write(json.dumps({**record, "embedding": [float(x) for x in vector]}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


def run_embed(args) -> int:
    from convert import CheckpointError

    from .modeling import JinaEmbeddingsV3

    task = None if args.task.lower() == "none" else args.task
    try:
        texts, records = _read_input(args.input, args.text_field)
        model = JinaEmbeddingsV3.from_pretrained(args.model, dtype=args.dtype)
        if task is not None:
            model.resolve_task(task)  # an unknown task fails before any work
        emb = model.encode(texts, task=task, batch_size=args.batch_size,
                           max_length=args.max_length, truncate_dim=args.truncate_dim)
        _write_output(args.output, emb, texts, records)
    except (_UsageError, CheckpointError, FileNotFoundError, NotADirectoryError, ValueError,
            TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"embedded {len(texts)} text(s) -> {args.output} [{emb.shape[0]}, {emb.shape[1]}]",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jina-jax")
    commands = parser.add_subparsers(dest="command", required=True)
    from convert.__main__ import build_parser, run as run_convert

    build_parser(commands.add_parser("convert", help="convert a checkpoint to a jina-jax folder"))
    _embed_parser(commands.add_parser("embed", help="embed texts from a file or stdin"))
    rand = commands.add_parser(
        "random-checkpoint",
        help="write a random-weight checkpoint in the release format (meaningless embeddings; "
             "for offline first runs and benchmarks)")
    rand.add_argument("dst")
    rand.add_argument("--layers", type=int, default=24, help="number of layers (24 = released)")
    rand.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="storage dtype (the release ships bfloat16)")
    rand.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "convert":
        return run_convert(args)
    if args.command == "embed":
        return run_embed(args)
    from convert.random_checkpoint import write_random_release
    from jina_jax.config import JinaConfig

    write_random_release(args.dst, JinaConfig(num_hidden_layers=args.layers), seed=args.seed,
                         dtype=args.dtype)
    print(f"wrote a random {args.layers}-layer release-format checkpoint to {args.dst} "
          "(its embeddings are meaningless)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
