"""The `jina-jax` command line: `convert`, `embed`, `finetune`, `serve`, `random-checkpoint`.

Each subcommand imports what it needs when it runs, so `jina-jax --help` and every subcommand's
`--help` answer at once. Every command follows `commands.py`: the parser refuses bad values, an
existing output needs --overwrite, outputs appear whole or not at all (`files.py`), and an
expected stop (bad input, Ctrl-C, a closed pipe) ends in one line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .commands import (UsageError, check_output, non_negative_float, non_negative_int,
                       positive_float, positive_int, run_guarded)


def _embed_parser(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="hub id or checkpoint folder")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--task", help="task adapter (e.g. retrieval.passage), or 'none' for no "
                      "adapter")
    task.add_argument("--query", dest="task", action="store_const", const="retrieval.query",
                      help="shorthand for --task retrieval.query")
    task.add_argument("--document", dest="task", action="store_const",
                      const="retrieval.passage", help="shorthand for --task retrieval.passage")
    for flag, default, text in (
            ("--input", "-", "text file (one text per line) or JSONL (one object per line); "
                             "- = stdin. Blank lines are skipped in both."),
            ("--text-field", None, "read JSONL records and embed this field (default 'text' "
                                   "for .jsonl input)"),
            ("--output", "-", "OUT.npy (float32 [N, D]) or OUT.jsonl (input records + "
                              "'embedding'); - = JSONL on stdout"),
            ("--ranges", None, "RANGES.npy: per-dimension [min, max] ([2, D]) for int8/uint8")):
        p.add_argument(flag, default=default, help=text)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    for flag, default, text in (
            ("--truncate-dim", None, "Matryoshka dimension"),
            ("--max-length", None, "tokens per text (default 8192)"),
            ("--batch-size", 32, "rows per batch"),
            ("--chunk-tokens", None, "with --late-chunking: fixed chunks of this many tokens")):
        p.add_argument(flag, type=positive_int, default=default, help=text)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--precision", choices=["float32", "int8", "uint8", "binary", "ubinary"],
                   default="float32", help="quantised output, as sentence-transformers' "
                   "quantize_embeddings (int8/uint8 need --ranges)")
    p.add_argument("--late-chunking", action="store_true",
                   help="one JSONL record per chunk (doc, chunk, start, end, embedding): "
                        "sentences, or --chunk-tokens pieces, embedded in document context")


def _check_model_options(model, args):
    """The flags that depend on the checkpoint, named as flags."""
    from .tokenize import position_limit

    cfg = model.config
    limit = position_limit(cfg)
    if args.max_length is not None and not 2 <= args.max_length <= limit:
        raise UsageError(f"--max-length must be in 2..{limit} for this model, got "
                         f"{args.max_length}")
    if args.truncate_dim is not None and args.truncate_dim > cfg.hidden_size:
        raise UsageError(f"--truncate-dim must be in 1..{cfg.hidden_size} for this model, got "
                         f"{args.truncate_dim}")
    task = None if args.task.lower() == "none" else args.task
    if task is not None:
        try:
            task = model.resolve_task(task)
        except ValueError as e:
            raise UsageError(f"--task: {e}") from None
    return task


class NpyWriter:
    """Rows of [N, D] appended to an open `.npy` file whose row count is written last: the
    header reserves room for any N and is rewritten when the rows are done."""
    HEADER = 128

    def __init__(self, f, dim: int, dtype):
        import numpy as np

        self.f, self.dim, self.rows, self.dtype = f, dim, 0, np.dtype(dtype)
        f.write(self._header())  # a placeholder of the final header's size

    def _header(self) -> bytes:
        descr = self.dtype.str
        text = (f"{{'descr': '{descr}', 'fortran_order': False, "
                f"'shape': ({self.rows}, {self.dim}), }}")
        text = text.ljust(self.HEADER - 10 - 1) + "\n"
        return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")

    def write(self, vector, record):
        self.f.write(vector.astype(self.dtype).tobytes())
        self.rows += 1

    def close(self):
        self.f.seek(0)
        self.f.write(self._header())


class JsonlWriter:
    """One JSON object per text: the input record (or {"text": ...}) plus "embedding"."""

    def __init__(self, f):
        self.f, self.rows = f, 0

    def write(self, vector, record):
        self.f.write(json.dumps({**record, "embedding": vector.tolist()}) + "\n")
        self.rows += 1

    def close(self):
        self.f.flush()


def run_embed(args) -> int:
    from collections import deque

    import numpy as np

    from .embedder import JinaEmbeddingsV3
    from .files import atomic_file
    from .records import TextInput

    if args.input != "-" and not os.path.isfile(args.input):
        raise UsageError(f"--input {args.input}: no such file")
    if args.ranges is not None and not os.path.isfile(args.ranges):
        raise UsageError(f"--ranges {args.ranges}: no such file")
    if args.precision.endswith("int8") and args.ranges is None:
        raise UsageError(f"--precision {args.precision} needs --ranges RANGES.npy (per-dimension "
                         "min and max, [2, D]): a stream cannot calibrate on itself")
    if args.late_chunking and args.precision != "float32":
        raise UsageError("--late-chunking writes float32 chunk embeddings; drop --precision")
    if args.chunk_tokens is not None and not args.late_chunking:
        raise UsageError("--chunk-tokens needs --late-chunking")
    to_stdout = args.output == "-"
    if not to_stdout:
        suffixes = (".jsonl",) if args.late_chunking else (".npy", ".jsonl")
        check_output(args.output, "--output", overwrite=args.overwrite,
                     sources=[args.input, args.ranges], suffixes=suffixes)
    model = JinaEmbeddingsV3.from_pretrained(args.model, dtype=args.dtype)
    task = _check_model_options(model, args)
    dim = args.truncate_dim or model.config.truncate_dim or model.config.hidden_size
    ranges = None if args.ranges is None else np.load(args.ranges)

    source = TextInput(args.input, args.text_field)
    records: deque = deque()

    def texts():
        for text, record in source:
            records.append(record if record is not None else {"text": text})
            yield text

    if args.late_chunking:
        embeddings = _late_chunk_records(model, texts(), records, task, args)
    else:
        embeddings = ((vector, records.popleft()) for vector in model.iter_encode(
            texts(), task=task, batch_size=args.batch_size, max_length=args.max_length,
            truncate_dim=args.truncate_dim, precision=args.precision, ranges=ranges,
            show_progress_bar=sys.stderr.isatty()))

    def write_all(writer) -> int:
        for vector, record in embeddings:
            writer.write(vector, record)
        writer.close()
        return writer.rows

    if to_stdout:
        count = write_all(JsonlWriter(sys.stdout))
    elif args.output.endswith(".npy"):
        dtype = {"float32": "<f4", "int8": "i1", "binary": "i1"}.get(args.precision, "u1")
        width = -(-dim // 8) if args.precision.endswith("binary") else dim
        with atomic_file(args.output, "wb") as f:
            count = write_all(NpyWriter(f, width, dtype))
    else:
        with atomic_file(args.output, "w", encoding="utf-8") as f:
            count = write_all(JsonlWriter(f))
    skipped = f", {source.skipped} blank line(s) skipped" if source.skipped else ""
    what = "chunk(s)" if args.late_chunking else "text(s)"
    loaded = model.forward.loaded_count
    shapes = f"; {model.compile_count} shape(s), {loaded} from the compilation cache"
    print(f"embedded {count} {what} -> {args.output} [{count}, {dim}]{skipped}{shapes}",
          file=sys.stderr)
    return 0


def _late_chunk_records(model, texts, records, task, args, group: int = 64):
    """(vector, record) per chunk: documents taken `group` at a time from the stream (their
    input records are dropped as they are done)."""
    import itertools

    doc = 0
    while True:
        documents = list(itertools.islice(texts, group))
        if not documents:
            return
        results = model.encode_late_chunks(
            documents, task=task, chunk_tokens=args.chunk_tokens, max_length=args.max_length,
            truncate_dim=args.truncate_dim, batch_size=args.batch_size, show_progress_bar=False)
        for vectors, spans in results:
            records.popleft()
            for j, (vector, (start, end)) in enumerate(zip(vectors, spans)):
                yield vector, {"doc": doc, "chunk": j, "start": start, "end": end}
            doc += 1


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
    p.add_argument("--rank", type=positive_int, default=None, help="rank of a new adapter")
    p.add_argument("--alpha", type=positive_float, default=None,
                   help="alpha of a new adapter (default rank)")
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--warmup", type=non_negative_int, default=0,
                   help="linear warm-up steps before cosine decay")
    p.add_argument("--temperature", type=positive_float, default=0.05)
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="tokens per text (default 512)")
    p.add_argument("--eval-data", default=None, help="JSONL pairs for recall@k")
    p.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="steps between evaluations (0: at the end only)")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--accumulate", type=positive_int, default=1, help="micro-batches per step")
    p.add_argument("--remat", default=None, choices=["full", "dots", "dots_no_batch"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (trained weights stay float32)")
    p.add_argument("--format", choices=["jina_jax", "transformers", "original"],
                   default="jina_jax", help="checkpoint format written to --output")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.add_argument("--save-state", action="store_true",
                   help="also write OUTPUT/train_state.safetensors (for --resume)")
    p.add_argument("--resume", default=None, help="a train_state.safetensors to continue from")


def run_finetune(args) -> int:
    import jax
    import numpy as np
    import optax
    from tqdm.auto import tqdm

    from . import training
    from .embedder import JinaEmbeddingsV3
    from .files import atomic_folder

    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data),
                       ("--resume", args.resume)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: no such file")
    output = check_output(args.output, "--output", overwrite=args.overwrite, folder=True,
                          sources=[args.model, args.data, args.eval_data, args.resume])
    records = training.read_pairs(args.data)
    evals = training.read_pairs(args.eval_data) if args.eval_data else None
    if len(records) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(records)} "
                          f"training pairs in {args.data}")

    model = JinaEmbeddingsV3.from_pretrained(args.model)
    devices = len(jax.devices())
    if args.batch_size < devices or args.batch_size % devices:
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of the device "
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
    with atomic_folder(output) as folder:  # checkpoint and train state appear together
        model.save_pretrained(folder, format=args.format)
        if args.save_state:
            trainer.save_state(os.path.join(folder, "train_state.safetensors"), state)
    print(f"fine-tuned {', '.join(sorted({t for t in (query_task, passage_task)}))} for "
          f"{args.steps - start} step(s) -> {output} ({args.format})", file=sys.stderr)
    return 0


def _finetune_tasks(model, args) -> tuple[str, str]:
    """(query task, passage task) for --adapter; a new adapter is created here."""
    if args.adapter == "retrieval":
        if args.rank is not None:
            raise UsageError("--rank creates a new adapter; it does not apply to "
                              "--adapter retrieval")
        return model.resolve_task("retrieval.query"), model.resolve_task("retrieval.passage")
    try:
        name = model.resolve_task(args.adapter)
    except ValueError:
        if args.rank is None:
            raise UsageError(f"unknown adapter {args.adapter!r}; this checkpoint has "
                              f"{list(model.tasks)} (or 'retrieval'); add --rank R to create a "
                              f"new adapter named {args.adapter!r}") from None
        model.add_adapter(args.adapter, rank=args.rank, alpha=args.alpha, seed=args.seed)
        return args.adapter, args.adapter
    if args.rank is not None:
        raise UsageError(f"--rank creates a new adapter, but {args.adapter!r} already exists")
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


def _serve_parser(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="hub id or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=non_negative_int, default=8080,
                   help="port (default 8080; 0 picks a free one, printed at start)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--served-model-name", default="jina-embeddings-v3",
                   help="the model name clients send (also NAME:TASK)")
    p.add_argument("--api-key", default=os.environ.get("JINA_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: "
                        "$JINA_JAX_API_KEY, else none)")
    p.add_argument("--default-task", help="adapter for requests that name none (default: no "
                   "adapter, as encode(task=None))")
    for flag, default, text in (
            ("--max-batch-tokens", 8192, "padded tokens per round of batching"),
            ("--max-batch-size", 64, "texts per forward batch"),
            ("--max-queue", 4096, "texts waiting before requests get 503 + Retry-After"),
            ("--max-inputs", 2048, "texts per request"),
            ("--max-input-chars", 65536, "characters per text (413 beyond)"),
            ("--max-length", None, "tokens per text, longer ones truncated (default 8192); "
                                   "lower values compile fewer shapes at start")):
        p.add_argument(flag, type=positive_int, default=default, help=text)
    p.add_argument("--max-wait-ms", type=non_negative_float, default=2.0,
                   help="how long the first waiting text waits for others to join its batch")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default="info")


def run_serve(args) -> int:
    try:
        from . import serve
    except ImportError as e:
        raise UsageError(f"serve needs the server extra: pip install 'jina-jax[serve]' ({e})") \
            from None
    if args.max_inputs > args.max_queue:
        raise UsageError(f"--max-inputs ({args.max_inputs}) cannot exceed --max-queue "
                         f"({args.max_queue})")
    if args.api_key == "":
        raise UsageError("--api-key is empty")
    settings = serve.Settings(
        args.model, served_name=args.served_model_name, dtype=args.dtype, api_key=args.api_key,
        default_task=args.default_task, max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, max_inputs=args.max_inputs,
        max_input_chars=args.max_input_chars, max_length=args.max_length)
    try:
        return serve.run(settings, args.host, args.port, args.log_level)
    except serve.LoadFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run_random_checkpoint(args) -> int:
    from convert.random_checkpoint import write_random_release

    from .config import JinaConfig

    check_output(args.dst, "DST", overwrite=args.overwrite, folder=True)
    write_random_release(args.dst, JinaConfig(num_hidden_layers=args.layers), seed=args.seed,
                         dtype=args.dtype)
    print(f"wrote a random {args.layers}-layer release-format checkpoint to {args.dst} "
          "(its embeddings are meaningless)")
    return 0


def _plan_parser(p: argparse.ArgumentParser):
    p.add_argument("--target", required=True,
                   help="h100, h200, v5e-1, v5e-4, v5e-8, v6e-1, v6e-4, or a TPU topology such "
                        "as v5e:2x4 (a GPU needs the [cuda12] extra and JAX_PLATFORMS=cpu, a TPU "
                        "the [tpu] extra)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--max-length", type=positive_int, default=8192, help="tokens per text")
    p.add_argument("--batch-size", type=positive_int, default=32, help="encode's batch size")
    p.add_argument("--train-batch-size", type=positive_int, default=32,
                   help="query/passage pairs a train step")
    p.add_argument("--train-length", type=positive_int, default=512, help="tokens a training text")
    p.add_argument("--shard-params", action="store_true",
                   help="weights split over the devices (model.shard(shard_params=True))")
    p.add_argument("--layers", type=positive_int, default=24,
                   help="encoder layers (24 = released; fewer for a quick look)")


def run_plan(args) -> int:
    from . import aot
    from .config import JinaConfig

    try:
        target = aot.target(args.target)
    except ValueError as e:
        raise UsageError(f"--target: {e}") from None
    limit = JinaConfig().max_position_embeddings - 2
    if args.max_length > limit or args.train_length > limit:
        raise UsageError(f"--max-length and --train-length must be at most {limit}")
    try:
        aot.devices(target)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    aot.plan(target, dtype=args.dtype, max_length=args.max_length, batch_size=args.batch_size,
             train_batch_size=args.train_batch_size, train_length=args.train_length,
             shard_params=args.shard_params, config=JinaConfig(num_hidden_layers=args.layers),
             log=lambda line: print(line, flush=True))
    return 0


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the command started: nothing was written
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


def _main(argv) -> int:
    from convert.__main__ import build_parser, run as run_convert

    parser = argparse.ArgumentParser(prog="jina-jax")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser(commands.add_parser("convert", help="convert a checkpoint to a jina-jax folder"))
    _embed_parser(commands.add_parser("embed", help="embed texts from a file or stdin"))
    _finetune_parser(commands.add_parser(
        "finetune", help="fine-tune a task adapter on JSONL query/positive pairs"))
    _serve_parser(commands.add_parser(
        "serve", help="serve the OpenAI embeddings API (/v1/embeddings), batching all clients' "
                      "requests together"))
    _plan_parser(commands.add_parser(
        "plan", help="compile for a GPU or TPU this host does not have: does encode, the "
                     "server's warm-up and a train step fit its memory, and the largest batches"))
    rand = commands.add_parser(
        "random-checkpoint",
        help="write a random-weight checkpoint in the release format (meaningless embeddings; "
             "for offline first runs and benchmarks)")
    rand.add_argument("dst")
    rand.add_argument("--layers", type=positive_int, default=24,
                      help="number of layers (24 = released)")
    rand.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="storage dtype (the release ships bfloat16)")
    rand.add_argument("--seed", type=non_negative_int, default=0)
    rand.add_argument("--overwrite", action="store_true", help="replace an existing DST folder")
    args = parser.parse_args(argv)
    run, target = {"convert": (run_convert, args.__dict__.get("dst")),
                   "embed": (run_embed, args.__dict__.get("output")),
                   "finetune": (run_finetune, args.__dict__.get("output")),
                   "serve": (run_serve, None),
                   "plan": (run_plan, None),
                   "random-checkpoint": (run_random_checkpoint, args.__dict__.get("dst"))}[
                       args.command]
    return run_guarded(run, args, None if target == "-" else target)


if __name__ == "__main__":
    sys.exit(main())
