"""The `jina-jax` command line: `convert`, `embed`, `finetune`, `random-checkpoint`."""

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
    from .records import read_jsonl

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
    for n, record in read_jsonl(lines, path):
        if not isinstance(record.get(field), str):
            raise _UsageError(f"{path}:{n}: no string field {field!r}")
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

    from .embedder import JinaEmbeddingsV3

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


def _finetune_parser(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="hub id or checkpoint folder")
    p.add_argument("--data", required=True,
                   help='JSONL training pairs: {"query": ..., "positive": ..., "negative"?: '
                        'str or [str]}')
    p.add_argument("--output", required=True, help="folder for the fine-tuned checkpoint")
    p.add_argument("--adapter", default="retrieval",
                   help="'retrieval' (queries through retrieval.query, passages through "
                        "retrieval.passage; trains both), an existing task (both sides through "
                        "it), or a new name together with --rank")
    p.add_argument("--rank", type=int, default=None, help="rank of a new adapter")
    p.add_argument("--alpha", type=float, default=None, help="alpha of a new adapter (default rank)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before cosine decay")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default 512)")
    p.add_argument("--eval-data", default=None, help="JSONL pairs for recall@k")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations "
                   "(0: at the end only)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    p.add_argument("--remat", default=None, choices=["full", "dots", "dots_no_batch"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (trained weights stay float32)")
    p.add_argument("--format", choices=["jina_jax", "transformers", "original"],
                   default="jina_jax", help="checkpoint format written to --output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-state", action="store_true",
                   help="also write OUTPUT/train_state.safetensors (for --resume)")
    p.add_argument("--resume", default=None, help="a train_state.safetensors to continue from")


def run_finetune(args) -> int:
    from convert import CheckpointError

    try:
        return _finetune(args)
    except (_UsageError, CheckpointError, FileNotFoundError, NotADirectoryError, ValueError,
            TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _finetune(args) -> int:
    import os

    import jax
    import numpy as np
    import optax
    from tqdm.auto import tqdm

    from . import training
    from .embedder import JinaEmbeddingsV3

    output = os.path.abspath(args.output)
    if not os.path.isdir(os.path.dirname(output)):
        raise _UsageError(f"--output: the parent folder {os.path.dirname(output)} does not exist")
    if os.path.exists(output) and not os.path.isdir(output):
        raise _UsageError(f"--output {output} exists and is not a folder")
    for name in ("steps", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            raise _UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.rank is not None and args.rank < 1:
        raise _UsageError(f"--rank must be a positive integer, got {args.rank}")
    records = training.read_pairs(args.data)
    evals = training.read_pairs(args.eval_data) if args.eval_data else None
    if len(records) < args.batch_size:
        raise _UsageError(f"--batch-size {args.batch_size} is larger than the {len(records)} "
                          f"training pairs in {args.data}")

    model = JinaEmbeddingsV3.from_pretrained(args.model)
    devices = len(jax.devices())
    if args.batch_size < devices or args.batch_size % devices:
        raise _UsageError(f"--batch-size {args.batch_size} must be a multiple of the device "
                          f"count ({devices}): every device takes the same number of rows")
    if devices > 1:
        model.shard()
    query_task, passage_task = _finetune_tasks(model, args)
    negatives = _negatives(records)
    objective = training.Contrastive(query_task, passage_task, temperature=args.temperature)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        training.cosine_schedule(args.lr, args.steps, args.warmup)))
    trainer = training.Trainer(model, objective, optimizer, remat=args.remat,
                               accumulate=args.accumulate, compute_dtype=args.dtype)
    state = trainer.restore(args.resume) if args.resume else trainer.init(args.seed)
    start = int(state.step)
    per_epoch = len(records) // args.batch_size

    def evaluate(step):
        model.update(trainer.trained(state))
        recall = training.recall_at_k(model, [r["query"] for r in evals],
                                      [r["positive"] for r in evals], (1, 5, 10),
                                      query_task=query_task, passage_task=passage_task,
                                      max_length=args.max_length)
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in recall.items()),
                   file=sys.stderr)

    if evals is not None and start == 0:
        evaluate(0)
    losses = []
    with tqdm(total=args.steps, initial=start, desc="finetune", unit="step",
              file=sys.stderr) as bar:
        for step in range(start, args.steps):
            # The rows of step s depend on s alone, so a resumed run sees the same batches.
            epoch, i = divmod(step, per_epoch)
            order = np.random.default_rng([args.seed, epoch]).permutation(len(records))
            rows = [records[j] for j in order[i * args.batch_size:(i + 1) * args.batch_size]]
            batch = training.contrastive_batch(
                model, [r["query"] for r in rows], [r["positive"] for r in rows],
                None if negatives is None else [r["negative"][:negatives] for r in rows],
                query_task=query_task, passage_task=passage_task, max_length=args.max_length)
            state, metrics = trainer.step(state, batch)
            losses.append(float(metrics["loss"]))
            bar.update(1)
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                tqdm.write(f"step {done}: loss {np.mean(losses[-args.log_every:]):.4f}",
                           file=sys.stderr)
            if evals is not None and args.eval_every and done % args.eval_every == 0 \
                    and done != args.steps:
                evaluate(done)
    if evals is not None:
        evaluate(args.steps)
    model.update(trainer.trained(state))
    model.save_pretrained(output, format=args.format)
    if args.save_state:
        trainer.save_state(os.path.join(output, "train_state.safetensors"), state)
    print(f"fine-tuned {', '.join(sorted({t for t in (query_task, passage_task)}))} for "
          f"{args.steps - start} step(s) -> {output} ({args.format})", file=sys.stderr)
    return 0


def _finetune_tasks(model, args) -> tuple[str, str]:
    """(query task, passage task) for --adapter; a new adapter is created here."""
    if args.adapter == "retrieval":
        if args.rank is not None:
            raise _UsageError("--rank creates a new adapter; it does not apply to "
                              "--adapter retrieval")
        return model.resolve_task("retrieval.query"), model.resolve_task("retrieval.passage")
    try:
        name = model.resolve_task(args.adapter)
    except ValueError:
        if args.rank is None:
            raise _UsageError(f"unknown adapter {args.adapter!r}; this checkpoint has "
                              f"{list(model.tasks)} (or 'retrieval'); add --rank R to create a "
                              f"new adapter named {args.adapter!r}") from None
        model.add_adapter(args.adapter, rank=args.rank, alpha=args.alpha, seed=args.seed)
        return args.adapter, args.adapter
    if args.rank is not None:
        raise _UsageError(f"--rank creates a new adapter, but {args.adapter!r} already exists")
    return name, name


def _negatives(records) -> int | None:
    """How many hard negatives every record has (the per-step shape), None if some have none."""
    counts = [len(r.get("negative") or ()) for r in records]  # read_pairs made them lists
    if min(counts) == 0:
        if max(counts):
            print(f"note: {sum(c > 0 for c in counts)} of {len(records)} records have hard "
                  "negatives; training without them", file=sys.stderr)
        return None
    return min(counts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jina-jax")
    commands = parser.add_subparsers(dest="command", required=True)
    from convert.__main__ import build_parser, run as run_convert

    build_parser(commands.add_parser("convert", help="convert a checkpoint to a jina-jax folder"))
    _embed_parser(commands.add_parser("embed", help="embed texts from a file or stdin"))
    _finetune_parser(commands.add_parser(
        "finetune", help="fine-tune a task adapter on JSONL query/positive pairs"))
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
    if args.command == "finetune":
        return run_finetune(args)
    from convert.random_checkpoint import write_random_release

    from .config import JinaConfig

    write_random_release(args.dst, JinaConfig(num_hidden_layers=args.layers), seed=args.seed,
                         dtype=args.dtype)
    print(f"wrote a random {args.layers}-layer release-format checkpoint to {args.dst} "
          "(its embeddings are meaningless)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
