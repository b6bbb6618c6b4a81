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

from .commands import (
    UsageError,
    add_dtype_flag,
    check_output,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_guarded,
)


def _embed_parser(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="hub id or checkpoint folder")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument(
        "--task", help="task adapter (e.g. retrieval.passage), or 'none' for no adapter"
    )
    task.add_argument(
        "--query",
        dest="task",
        action="store_const",
        const="retrieval.query",
        help="shorthand for --task retrieval.query",
    )
    task.add_argument(
        "--document",
        dest="task",
        action="store_const",
        const="retrieval.passage",
        help="shorthand for --task retrieval.passage",
    )
    for flag, default, text in (
        (
            "--input",
            "-",
            "text file (one text per line), JSONL (one object per line) or "
            "CSV (with its header); - = stdin. Blank lines are skipped. With "
            "a folder --output also Parquet, a folder or a glob.",
        ),
        (
            "--text-field",
            None,
            "read JSONL records and embed this field (default 'text' for .jsonl input)",
        ),
        (
            "--output",
            "-",
            "OUT.npy (float32 [N, D]) or OUT.jsonl (input records + "
            "'embedding'); - = JSONL on stdout; a folder (or a path ending "
            "in /): Parquet shards + manifest.json, resumable",
        ),
        ("--ranges", None, "RANGES.npy: per-dimension [min, max] ([2, D]) for int8/uint8"),
    ):
        p.add_argument(flag, default=default, help=text)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    for flag, default, text in (
        ("--truncate-dim", None, "Matryoshka dimension"),
        ("--max-length", None, "tokens per text (default 8192)"),
        ("--batch-size", 32, "rows per batch"),
        ("--chunk-tokens", None, "with --late-chunking: fixed chunks of this many tokens"),
    ):
        p.add_argument(flag, type=positive_int, default=default, help=text)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--precision",
        choices=["float32", "int8", "uint8", "binary", "ubinary"],
        default="float32",
        help="quantised output, as sentence-transformers' "
        "quantize_embeddings (int8/uint8 need --ranges)",
    )
    p.add_argument(
        "--late-chunking",
        action="store_true",
        help="one JSONL record per chunk (doc, chunk, start, end, embedding): "
        "sentences, or --chunk-tokens pieces, embedded in document context",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _dataset_flags(p)
    _ray_flags(p)


DATASET_FLAGS = (
    "--id-field",
    "--keep-fields",
    "--skip-empty",
    "--shard-index",
    "--shard-count",
    "--shard-rows",
)


def _dataset_flags(p: argparse.ArgumentParser):
    """The flags of a dataset run (`--output` a folder, or ending in /): jina_jax.data.job."""
    g = p.add_argument_group(
        "dataset output (--output FOLDER/: Parquet shards + manifest.json, "
        "resumable; --input may then be a folder or a glob of .txt, "
        ".jsonl, .csv and .parquet files)"
    )
    g.add_argument(
        "--id-field",
        help="the field or column holding each row's id (default: "
        "the file's name and row number, 'name:row')",
    )
    g.add_argument("--keep-fields", help="comma-separated fields carried into the output")
    g.add_argument(
        "--skip-empty",
        action="store_true",
        help="leave out rows whose text is "
        "null or blank (counted) instead of stopping with file:row",
    )
    g.add_argument(
        "--shard-index",
        type=non_negative_int,
        default=None,
        help="this process's index: it does shards i, i + n, ... (with "
        "--shard-count n; default JAX's process index under jax.distributed)",
    )
    g.add_argument(
        "--shard-count",
        type=positive_int,
        default=None,
        help="how many processes share the output folder",
    )
    g.add_argument(
        "--shard-rows", type=positive_int, default=None, help="input rows per shard (default 65536)"
    )


RAY_FLAGS = ("--ray-address", "--ray-actors", "--ray-num-cpus", "--ray-num-gpus", "--ray-resources")


def _ray_flags(p: argparse.ArgumentParser):
    """`embed --engine ray`: the dataset job's shards as Ray tasks (jina_jax.data.ray_data)."""
    g = p.add_argument_group("engine (dataset output only)")
    g.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: every shard a task on a Ray "
        "cluster (the [ray] extra), same folder and manifest",
    )
    g.add_argument(
        "--ray-address",
        help="an existing cluster (ray://HOST:10001 or HOST:6379; "
        "default: $RAY_ADDRESS, else a local cluster on this machine)",
    )
    g.add_argument(
        "--ray-actors",
        type=positive_int,
        default=1,
        help="actors, one model each (default 1); one per GPU, TPU host or CPU node",
    )
    g.add_argument(
        "--ray-num-cpus",
        type=non_negative_float,
        default=None,
        help="CPUs each actor asks for (default 0.5: leaves CPUs to Ray's tasks)",
    )
    g.add_argument(
        "--ray-num-gpus",
        type=non_negative_float,
        default=None,
        help="GPUs each actor asks for (e.g. 1)",
    )
    g.add_argument(
        "--ray-resources",
        type=json.loads,
        default=None,
        help="custom resources each actor asks for, JSON (e.g. '{\"TPU\": 4}')",
    )


def _check_engine(args) -> None:
    """--engine ray and its flags only where they apply."""
    if args.engine == "ray":
        if not _is_dataset(args):
            raise UsageError(
                "--engine ray writes a dataset: --output must be a folder (or a path ending in /)"
            )
        if args.shard_index is not None or args.shard_count is not None:
            raise UsageError(
                "--engine ray spreads the shards itself: drop --shard-index and --shard-count"
            )
        if args.ray_resources is not None and not isinstance(args.ray_resources, dict):
            raise UsageError("--ray-resources must be a JSON object, e.g. '{\"TPU\": 4}'")
        return
    for flag in RAY_FLAGS:
        if getattr(args, flag[2:].replace("-", "_")) not in (None, 1):
            raise UsageError(f"{flag} needs --engine ray")


def run_embed_ray(args, model, job, folder: str, common: dict):
    """The dataset job on Ray: this process is the driver (plans, keeps the manifest). common:
    the keywords both engines take."""
    try:
        import ray

        from .data.ray_data import embed_corpus_ray
    except ImportError as e:
        raise UsageError(str(e)) from None
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address is None:
        # A cluster started for this run: its workers at this process's niceness, as the local
        # job would run, not Ray's default nice 15 (on a shared machine that loses to the rest).
        os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    ray.init(
        address=address,
        include_dashboard=False if address is None else None,
        log_to_driver=not args.quiet,
        configure_logging=not args.quiet,
    )
    # --ray-actors -> actors=, --ray-num-cpus -> num_cpus=, ...
    placement = {
        flag[6:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag in RAY_FLAGS
        if flag != "--ray-address"
    }
    try:
        return embed_corpus_ray(model, job, folder, checkpoint=args.model, **placement, **common)
    finally:
        ray.shutdown()


def _is_dataset(args) -> bool:
    return args.output != "-" and (
        args.output.endswith(("/", os.sep)) or os.path.isdir(args.output)
    )


def _check_ranges(args) -> None:
    """--ranges names a file, and the int8/uint8 precisions (a stream) have one."""
    if args.ranges is not None and not os.path.isfile(args.ranges):
        raise UsageError(f"--ranges {args.ranges}: no such file")
    if args.precision.endswith("int8") and args.ranges is None:
        raise UsageError(
            f"--precision {args.precision} needs --ranges RANGES.npy (per-dimension "
            "min and max, [2, D]): a stream cannot calibrate on itself"
        )


def run_embed_dataset(args) -> int:
    """`embed --output FOLDER/`: the corpus job of jina_jax.data.job (resumable, sharded)."""
    import numpy as np

    from .embedder import JinaEmbeddingsV3

    try:
        from .data.job import DEFAULT_SHARD_ROWS, CorpusJob, Refused, embed_corpus
    except ImportError as e:
        raise UsageError(str(e)) from None
    if args.input == "-":
        raise UsageError(
            "a dataset --output needs files as --input (a file, a folder or a glob), not stdin"
        )
    if args.late_chunking:
        raise UsageError("--late-chunking writes JSONL; a folder --output is not supported")
    _check_ranges(args)
    if (args.shard_index is None) != (args.shard_count is None):
        raise UsageError("--shard-index and --shard-count go together")
    if args.shard_index is not None and args.shard_index >= args.shard_count:
        raise UsageError(
            f"--shard-index must be in 0..{args.shard_count - 1}, got {args.shard_index}"
        )
    folder = check_output(
        args.output.rstrip("/" + os.sep) or args.output,
        "--output",
        overwrite=True,
        folder=True,
        sources=[args.input, args.ranges],
    )
    model = JinaEmbeddingsV3.from_pretrained(args.model, dtype=args.dtype)
    task = _check_model_options(model, args)
    keep = tuple(f.strip() for f in args.keep_fields.split(",")) if args.keep_fields else ()
    job = CorpusJob(
        inputs=(args.input,),
        task=task,
        max_length=args.max_length,
        truncate_dim=args.truncate_dim,
        precision=args.precision,
        ranges=None if args.ranges is None else np.load(args.ranges),
        text_field=args.text_field,
        id_field=args.id_field,
        keep_fields=keep,
        skip_empty=args.skip_empty,
        shard_rows=args.shard_rows or DEFAULT_SHARD_ROWS,
    )
    log = None if args.quiet else sys.stderr
    common = {"batch_size": args.batch_size, "overwrite": args.overwrite, "log": log}
    try:
        if args.engine == "ray":
            summary = run_embed_ray(args, model, job, folder, common)
        else:
            summary = embed_corpus(
                model,
                job,
                folder,
                progress=False if args.quiet else None,
                shard_index=args.shard_index,
                shard_count=args.shard_count,
                **common,
            )
    except Refused as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        print(
            f"interrupted: the shards finished so far stay in {folder}; the same command "
            "finishes the rest",
            file=sys.stderr,
        )
        return 130
    print(
        summary.line()
        + (f" (made by ray: {args.ray_actors} actor(s))" if args.engine == "ray" else ""),
        file=sys.stderr,
    )
    return 0


def _check_model_options(model, args):
    """The flags that depend on the checkpoint, named as flags."""
    from .tokenize import position_limit

    cfg = model.config
    limit = position_limit(cfg)
    if args.max_length is not None and not 2 <= args.max_length <= limit:
        raise UsageError(
            f"--max-length must be in 2..{limit} for this model, got {args.max_length}"
        )
    if args.truncate_dim is not None and args.truncate_dim > cfg.hidden_size:
        raise UsageError(
            f"--truncate-dim must be in 1..{cfg.hidden_size} for this model, got "
            f"{args.truncate_dim}"
        )
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
        text = (
            f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({self.rows}, {self.dim}), }}"
        )
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

    _check_engine(args)
    if _is_dataset(args):
        return run_embed_dataset(args)
    for flag in DATASET_FLAGS:
        if getattr(args, flag[2:].replace("-", "_")) not in (None, False):
            raise UsageError(f"{flag} needs a dataset --output (a folder, or a path ending in /)")
    if args.input.endswith((".parquet", ".pq")) or os.path.isdir(args.input):
        raise UsageError(
            f"--input {args.input}: Parquet files and folders need a dataset "
            "--output (a folder, or a path ending in /)"
        )
    if args.input != "-" and not os.path.isfile(args.input):
        raise UsageError(f"--input {args.input}: no such file")
    _check_ranges(args)
    if args.late_chunking and args.precision != "float32":
        raise UsageError("--late-chunking writes float32 chunk embeddings; drop --precision")
    if args.chunk_tokens is not None and not args.late_chunking:
        raise UsageError("--chunk-tokens needs --late-chunking")
    to_stdout = args.output == "-"
    if not to_stdout:
        suffixes = (".jsonl",) if args.late_chunking else (".npy", ".jsonl")
        check_output(
            args.output,
            "--output",
            overwrite=args.overwrite,
            sources=[args.input, args.ranges],
            suffixes=suffixes,
        )
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
        embeddings = (
            (vector, records.popleft())
            for vector in model.iter_encode(
                texts(),
                task=task,
                **_encode_options(args),
                precision=args.precision,
                ranges=ranges,
                show_progress_bar=sys.stderr.isatty() and not args.quiet,
            )
        )

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
    print(
        f"embedded {count} {what} -> {args.output} [{count}, {dim}]{skipped}{shapes}",
        file=sys.stderr,
    )
    return 0


def _encode_options(args) -> dict:
    """The encode keywords `embed` takes from its flags of the same names, both ways of
    embedding."""
    return {name: getattr(args, name) for name in ("batch_size", "max_length", "truncate_dim")}


def _late_chunk_records(model, texts, records, task, args, group: int = 64):
    """(vector, record) per chunk: documents taken `group` at a time from the stream (their
    input records are dropped as they are done)."""
    import itertools

    doc, options = 0, _encode_options(args)
    while True:
        documents = list(itertools.islice(texts, group))
        if not documents:
            return
        results = model.encode_late_chunks(
            documents, task=task, chunk_tokens=args.chunk_tokens, show_progress_bar=False, **options
        )
        for vectors, spans in results:
            records.popleft()
            for j, (vector, (start, end)) in enumerate(zip(vectors, spans)):
                yield vector, {"doc": doc, "chunk": j, "start": start, "end": end}
            doc += 1


def _finetune_parser(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="hub id or checkpoint folder")
    p.add_argument(
        "--data",
        required=True,
        help='JSONL training pairs: {"query": ..., "positive": ..., "negative"?: str or [str]}',
    )
    p.add_argument("--output", required=True, help="folder for the fine-tuned checkpoint")
    p.add_argument(
        "--adapter",
        default="retrieval",
        help="'retrieval' (queries through retrieval.query, passages through "
        "retrieval.passage; trains both), an existing task (both sides through "
        "it), or a new name together with --rank",
    )
    p.add_argument("--rank", type=positive_int, default=None, help="rank of a new adapter")
    p.add_argument(
        "--alpha", type=positive_float, default=None, help="alpha of a new adapter (default rank)"
    )
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument(
        "--warmup", type=non_negative_int, default=0, help="linear warm-up steps, then cosine decay"
    )
    p.add_argument("--temperature", type=positive_float, default=0.05)
    p.add_argument(
        "--max-length", type=positive_int, default=None, help="tokens per text (default 512)"
    )
    p.add_argument("--eval-data", default=None, help="JSONL pairs for recall@k")
    p.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=0,
        help="steps between evaluations (0: at the end only)",
    )
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--accumulate", type=positive_int, default=1, help="micro-batches per step")
    p.add_argument("--remat", default=None, choices=["full", "dots", "dots_no_batch"])
    add_dtype_flag(p, "compute dtype (trained weights stay float32)")
    p.add_argument(
        "--format",
        choices=["jina_jax", "transformers", "original"],
        default=None,
        help="checkpoint format written to --output (default jina_jax)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="write only the trained adapter(s) to --output: one PEFT LoRA folder "
        "per task (a few MB; `serve --adapter NAME=OUTPUT`, "
        "`from_pretrained(base, adapters={NAME: OUTPUT})`)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.add_argument(
        "--save-state",
        action="store_true",
        help="also write OUTPUT/train_state.safetensors (for --resume)",
    )
    p.add_argument("--resume", default=None, help="a train_state.safetensors to continue from")


def run_finetune(args) -> int:
    import jax
    import numpy as np
    import optax
    from tqdm.auto import tqdm

    from . import training
    from .adapters import put_adapters
    from .embedder import JinaEmbeddingsV3
    from .files import atomic_folder

    for flag, path in (
        ("--data", args.data),
        ("--eval-data", args.eval_data),
        ("--resume", args.resume),
    ):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: no such file")
    if args.adapter_only and args.format is not None:
        raise UsageError("--adapter-only writes PEFT adapter folders; drop --format")
    args.format = args.format or "jina_jax"
    output = check_output(
        args.output,
        "--output",
        overwrite=args.overwrite,
        folder=True,
        sources=[args.model, args.data, args.eval_data, args.resume],
    )
    records = training.read_pairs(args.data)
    evals = training.read_pairs(args.eval_data) if args.eval_data else None
    if len(records) < args.batch_size:
        raise UsageError(
            f"--batch-size {args.batch_size} is larger than the {len(records)} "
            f"training pairs in {args.data}"
        )

    model = JinaEmbeddingsV3.from_pretrained(args.model)
    devices = len(jax.devices())
    if args.batch_size < devices or args.batch_size % devices:
        raise UsageError(
            f"--batch-size {args.batch_size} must be a multiple of the device "
            f"count ({devices}): every device takes the same number of rows"
        )
    if devices > 1:
        model.shard()
    query_task, passage_task = _finetune_tasks(model, args)
    negatives = _negatives(records)
    objective = training.Contrastive(query_task, passage_task, temperature=args.temperature)
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(training.cosine_schedule(args.lr, args.steps, args.warmup)),
    )
    trainer = training.Trainer(
        model,
        objective,
        optimizer,
        remat=args.remat,
        accumulate=args.accumulate,
        compute_dtype=args.dtype,
    )
    state = trainer.restore(args.resume) if args.resume else trainer.init(args.seed)
    start = int(state.step)
    per_epoch = len(records) // args.batch_size

    def evaluate(step):
        assert evals is not None  # evaluate runs only with --eval-data
        model.update(trainer.trained(state))
        recall = training.recall_at_k(
            model,
            [r["query"] for r in evals],
            [r["positive"] for r in evals],
            (1, 5, 10),
            query_task=query_task,
            passage_task=passage_task,
            max_length=args.max_length,
        )
        tqdm.write(
            f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in recall.items()), file=sys.stderr
        )

    if evals is not None and start == 0:
        evaluate(0)
    losses = []
    with tqdm(
        total=args.steps, initial=start, desc="finetune", unit="step", file=sys.stderr
    ) as bar:
        for step in range(start, args.steps):
            # The rows of step s depend on s alone, so a resumed run sees the same batches.
            epoch, i = divmod(step, per_epoch)
            order = np.random.default_rng([args.seed, epoch]).permutation(len(records))
            rows = [records[j] for j in order[i * args.batch_size : (i + 1) * args.batch_size]]
            batch = training.contrastive_batch(
                model,
                [r["query"] for r in rows],
                [r["positive"] for r in rows],
                None if negatives is None else [r["negative"][:negatives] for r in rows],
                query_task=query_task,
                passage_task=passage_task,
                max_length=args.max_length,
            )
            state, metrics = trainer.step(state, batch)
            losses.append(float(metrics["loss"]))
            bar.update(1)
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                tqdm.write(
                    f"step {done}: loss {np.mean(losses[-args.log_every :]):.4f}", file=sys.stderr
                )
            if (
                evals is not None
                and args.eval_every
                and done % args.eval_every == 0
                and done != args.steps
            ):
                evaluate(done)
    if evals is not None:
        evaluate(args.steps)
    model.update(trainer.trained(state))
    trained = sorted({query_task, passage_task})
    with atomic_folder(output) as folder:  # checkpoint and train state appear together
        if args.adapter_only:
            put_adapters(
                folder,
                model.config,
                {t: model.adapters[t] for t in trained},
                {t: model.scales[t] for t in trained},
            )
        else:
            model.save_pretrained(folder, format=args.format)
        if args.save_state:
            trainer.save_state(os.path.join(folder, "train_state.safetensors"), state)
    what = "adapter folder" if args.adapter_only else args.format
    print(
        f"fine-tuned {', '.join(trained)} for {args.steps - start} step(s) -> {output} ({what})",
        file=sys.stderr,
    )
    return 0


def _finetune_tasks(model, args) -> tuple[str, str]:
    """(query task, passage task) for --adapter; a new adapter is created here."""
    if args.adapter == "retrieval":
        if args.rank is not None:
            raise UsageError(
                "--rank creates a new adapter; it does not apply to --adapter retrieval"
            )
        return model.resolve_task("retrieval.query"), model.resolve_task("retrieval.passage")
    try:
        name = model.resolve_task(args.adapter)
    except ValueError:
        if args.rank is None:
            raise UsageError(
                f"unknown adapter {args.adapter!r}; this checkpoint has "
                f"{list(model.tasks)} (or 'retrieval'); add --rank R to create a "
                f"new adapter named {args.adapter!r}"
            ) from None
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
            print(
                f"note: {sum(c > 0 for c in counts)} of {len(records)} records have hard "
                "negatives; training without them",
                file=sys.stderr,
            )
        return None
    return min(counts)


def _serve_parser(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="hub id or checkpoint folder")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.add_argument(
        "--port",
        type=non_negative_int,
        default=8080,
        help="port (default 8080; 0 picks a free one, printed at start)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--served-model-name",
        default="jina-embeddings-v3",
        help="the model name clients send (also NAME:TASK)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("JINA_JAX_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/ (default: $JINA_JAX_API_KEY, else none)",
    )
    p.add_argument(
        "--default-task",
        help="adapter for requests that name none (default: no adapter, as encode(task=None))",
    )
    for flag, default, text in (
        ("--max-batch-tokens", 8192, "padded tokens per round of batching"),
        ("--max-batch-size", 64, "texts per forward batch"),
        ("--max-queue", 4096, "texts waiting before requests get 503 + Retry-After"),
        ("--max-inputs", 2048, "texts per request"),
        ("--max-input-chars", 65536, "characters per text (413 beyond)"),
        (
            "--max-length",
            None,
            "tokens per text, longer ones truncated (default 8192); "
            "lower values compile fewer shapes at start",
        ),
    ):
        p.add_argument(flag, type=positive_int, default=default, help=text)
    p.add_argument(
        "--max-wait-ms",
        type=non_negative_float,
        default=2.0,
        help="how long the first waiting text waits for others to join its batch",
    )
    # Hostile input: bounded memory, time and connections (jina_jax/http_limits.py).
    for flag, kind, default, text in (
        (
            "--max-body-bytes-in-flight",
            positive_int,
            512 * 2**20,
            "bytes of request bodies received or parsed at once, all requests together "
            "(default 512 MiB; also the largest body): 503 beyond",
        ),
        (
            "--max-late-chunking-chars",
            positive_int,
            65536,
            "characters of a late-chunking document, its inputs joined (default 65536): 413 beyond",
        ),
        (
            "--header-timeout",
            positive_float,
            10.0,
            "seconds a connection has to send a request's headers (default 10): 408, closed",
        ),
        (
            "--idle-timeout",
            positive_float,
            5.0,
            "seconds an idle keep-alive connection stays open, and of silence allowed inside "
            "a body (default 5; 408)",
        ),
        (
            "--max-connections",
            positive_int,
            1024,
            "open connections (default 1024): beyond, 503 and closed at once",
        ),
    ):
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a user adapter as task NAME (repeatable): a `finetune "
        "--adapter-only` folder, a PEFT LoRA folder, or a fine-tuned "
        "checkpoint; PATH@TASK picks one of several",
    )
    p.add_argument(
        "--adapter-slots",
        type=non_negative_int,
        default=0,
        help="room for this many adapters loaded while serving (POST /v1/adapters)",
    )
    p.add_argument(
        "--max-adapter-rank",
        type=positive_int,
        default=None,
        help="every adapter is padded to this rank so shapes never change "
        "(default: the largest at start); a loaded adapter may not exceed it",
    )
    p.add_argument(
        "--warm-up-threads",
        type=positive_int,
        default=None,
        help="shapes compiled (or loaded from the executable store) at once during warm-up "
        "(default: one per core, at most 4)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")


def run_serve(args) -> int:
    try:
        from . import serve
    except ImportError as e:
        raise UsageError(
            f"serve needs the server extra: pip install 'jina-jax[serve]' ({e})"
        ) from None
    if args.max_inputs > args.max_queue:
        raise UsageError(
            f"--max-inputs ({args.max_inputs}) cannot exceed --max-queue ({args.max_queue})"
        )
    if args.api_key == "":
        raise UsageError("--api-key is empty")
    settings = serve.Settings(
        args.model,
        served_name=args.served_model_name,
        dtype=args.dtype,
        api_key=args.api_key,
        default_task=args.default_task,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_inputs=args.max_inputs,
        max_input_chars=args.max_input_chars,
        max_length=args.max_length,
        max_body_bytes_in_flight=args.max_body_bytes_in_flight,
        max_late_chars=args.max_late_chunking_chars,
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        adapters=tuple(_adapter_flags(args.adapter)),
        adapter_slots=args.adapter_slots,
        max_adapter_rank=args.max_adapter_rank,
        **({} if args.warm_up_threads is None else {"warm_up_threads": args.warm_up_threads}),
    )
    try:
        return serve.run(settings, args.host, args.port, args.log_level)
    except serve.LoadFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _adapter_flags(values) -> list[tuple[str, str]]:
    """--adapter NAME=PATH values, checked: [(name, path)]."""
    out = []
    for value in values:
        name, eq, path = value.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"--adapter must be NAME=PATH, got {value!r}")
        if any(name == n for n, _ in out):
            raise UsageError(f"--adapter {name} is given twice")
        folder = path.rpartition("@")[0] if "@" in path and not os.path.exists(path) else path
        if not os.path.isdir(folder):
            raise UsageError(f"--adapter {value}: no such folder {folder}")
        out.append((name, path))
    return out


def run_random_checkpoint(args) -> int:
    from convert.random_checkpoint import write_random_release

    from .config import JinaConfig

    check_output(args.dst, "DST", overwrite=args.overwrite, folder=True)
    write_random_release(
        args.dst, JinaConfig(num_hidden_layers=args.layers), seed=args.seed, dtype=args.dtype
    )
    print(
        f"wrote a random {args.layers}-layer release-format checkpoint to {args.dst} "
        "(its embeddings are meaningless)"
    )
    return 0


def _plan_parser(p: argparse.ArgumentParser):
    p.add_argument(
        "--target",
        required=True,
        help="h100, h200, v5e-1, v5e-4, v5e-8, v6e-1, v6e-4, or a TPU topology such "
        "as v5e:2x4 (a GPU needs the [cuda12] extra and JAX_PLATFORMS=cpu, a TPU "
        "the [tpu] extra)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--max-length", type=positive_int, default=8192, help="tokens per text")
    p.add_argument("--batch-size", type=positive_int, default=32, help="encode's batch size")
    p.add_argument(
        "--train-batch-size", type=positive_int, default=32, help="query/passage pairs a train step"
    )
    p.add_argument("--train-length", type=positive_int, default=512, help="tokens a training text")
    p.add_argument(
        "--shard-params",
        action="store_true",
        help="weights split over the devices (model.shard(shard_params=True))",
    )
    p.add_argument(
        "--layers",
        type=positive_int,
        default=24,
        help="encoder layers (24 = released; fewer for a quick look)",
    )


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
    aot.plan(
        target,
        dtype=args.dtype,
        max_length=args.max_length,
        batch_size=args.batch_size,
        train_batch_size=args.train_batch_size,
        train_length=args.train_length,
        shard_params=args.shard_params,
        config=JinaConfig(num_hidden_layers=args.layers),
        log=lambda line: print(line, flush=True),
    )
    return 0


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the command started: nothing was written
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


def _main(argv) -> int:
    from convert.__main__ import build_parser
    from convert.__main__ import run as run_convert

    parser = argparse.ArgumentParser(prog="jina-jax")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser(commands.add_parser("convert", help="convert a checkpoint to a jina-jax folder"))
    _embed_parser(commands.add_parser("embed", help="embed texts from a file or stdin"))
    _finetune_parser(
        commands.add_parser(
            "finetune", help="fine-tune a task adapter on JSONL query/positive pairs"
        )
    )
    _serve_parser(
        commands.add_parser(
            "serve",
            help="serve the OpenAI embeddings API (/v1/embeddings), batching all clients' "
            "requests together",
        )
    )
    _plan_parser(
        commands.add_parser(
            "plan",
            help="compile for a GPU or TPU this host does not have: does encode, the "
            "server's warm-up and a train step fit its memory, and the largest batches",
        )
    )
    rand = commands.add_parser(
        "random-checkpoint",
        help="write a random-weight checkpoint in the release format (meaningless embeddings; "
        "for offline first runs and benchmarks)",
    )
    rand.add_argument("dst")
    rand.add_argument(
        "--layers", type=positive_int, default=24, help="number of layers (24 = released)"
    )
    rand.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="storage dtype (the release ships bfloat16)",
    )
    rand.add_argument("--seed", type=non_negative_int, default=0)
    rand.add_argument("--overwrite", action="store_true", help="replace an existing DST folder")
    args = parser.parse_args(argv)
    run, target = {
        "convert": (run_convert, args.__dict__.get("dst")),
        "embed": (run_embed, args.__dict__.get("output")),
        "finetune": (run_finetune, args.__dict__.get("output")),
        "serve": (run_serve, None),
        "plan": (run_plan, None),
        "random-checkpoint": (run_random_checkpoint, args.__dict__.get("dst")),
    }[args.command]
    return run_guarded(run, args, None if target == "-" else target)


if __name__ == "__main__":
    sys.exit(main())
