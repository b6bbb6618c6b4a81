"""Embedding a corpus into a folder of Parquet shards, resumable and exactly once.

    job = CorpusJob(inputs=("corpus/",), task="retrieval.passage", id_field="doc_id")
    summary = embed_corpus(model, job, "out/")        # again after a crash: finishes the rest

The plan (`plan_job`): the input files in order, each cut into shards of `shard_rows` input rows
(a shard never spans two files). Shard i is written to `part-<i>.parquet` through a temporary
sibling that is fsynced and renamed (`files.atomic_path`), and only then recorded in the
manifest, which is itself rewritten atomically after each shard (`manifest.py`). A killed run
leaves finished shards, maybe one temporary file, and a manifest that lists only finished
shards; the rerun checks each recorded shard's size and sha256, skips those that check out,
removes the temporaries and redoes the rest. A rerun whose settings, model or inputs differ is
refused (`Refused`, one line naming the difference) unless `overwrite`.

Embeddings come from `model.iter_encode` over the stream of every shard still to do (one
pipeline across shard boundaries), so they equal `encode()` of the same texts; rows go to their
shard's writer as they come, a Parquet row group at a time: memory does not grow with the
corpus.

Several processes: process `i` of `n` (`shard_index`/`shard_count`, or JAX's process index and
count when `jax.distributed` is initialised) does shards i, i + n, ... into the same folder,
each with its own manifest; whoever finishes last merges them (see `manifest.py`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import os
import re
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from ..encode import DEFAULT_TOKEN_BUDGET, DEFAULT_WINDOW, Stats, check_options
from ..files import atomic_path
from .arrow import pa, pq
from .manifest import (
    Manifest,
    candidates,
    check_shard,
    difference,
    file_sha256,
    folder_lock,
    manifest_paths,
    model_fingerprint,
    process_manifest_name,
    read_manifests,
)
from .manifest import load as load_manifest
from .schema import (
    EMBEDDING_COLUMN,
    EMBEDDING_DTYPES,
    MANIFEST,
    as_text,
    check_columns,
    column_type,
    default_id,
    describe,
    embedding_column,
    embedding_width,
    output_schema,
    schema_record,
    shard_name,
)
from .sources import Fields, InputFile, expand, read_rows, scan

# The package's version (jina_jax/__init__.py, always imported before its submodules; taken
# from sys.modules so that the import graph keeps running one way).
__version__ = sys.modules[__name__.split(".")[0]].__version__
DEFAULT_SHARD_ROWS = 65_536  # four of encode's windows
GROUP_ROWS = 8192  # rows per Parquet row group of a shard (what the writer holds)
PROGRESS_EVERY = 256  # rows between progress updates
# what a folder may hold: shards, manifests and their temporaries (files.temporary_sibling)
OURS = re.compile(
    r"^(part-\d+\.parquet|manifest(\.\d+-of-\d+)?\.json|"
    r"\.(part-\d+\.parquet|manifest(\.\d+-of-\d+)?\.json)\.tmp-.+)$"
)


class Refused(ValueError):
    """The output folder cannot take this job (other settings, other inputs, foreign files);
    nothing was written."""


@dataclasses.dataclass(frozen=True)
class CorpusJob:
    """What to embed and how: every field changes the output (a rerun must match it).

    inputs: files, folders or globs (see `sources.expand`). task: an adapter, or None for no
    adapter; prompt, max_length, truncate_dim, normalize, precision, ranges: as `encode`.
    text_field: the text's field or column (default "text"); id_field: the id's (None: the
    input name and row, `schema.default_id`); keep_fields: fields carried into the output;
    skip_empty: leave out null or blank texts (counted) instead of stopping at the first;
    shard_rows: input rows per shard."""

    inputs: tuple[str, ...]
    task: str | None = None
    prompt: str | None = None
    max_length: int | None = None
    truncate_dim: int | None = None
    normalize: bool = True
    precision: str = "float32"
    ranges: object = dataclasses.field(default=None, compare=False)  # [2, D] for int8/uint8
    text_field: str | None = None
    id_field: str | None = None
    keep_fields: tuple[str, ...] = ()
    skip_empty: bool = False
    shard_rows: int = DEFAULT_SHARD_ROWS

    @property
    def fields(self) -> Fields:
        return Fields(self.text_field or "text", self.id_field, tuple(self.keep_fields))


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rows start + 1 .. stop of input file `input` (0-based [start, stop)), written to
    `file`."""

    index: int
    input: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return shard_name(self.index)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_json(self) -> dict:
        return {
            "shard": self.index,
            "file": self.file,
            "input": self.input,
            "start": self.start,
            "stop": self.stop,
        }


@dataclasses.dataclass(frozen=True)
class Plan:
    """A job made concrete against a model and its input files: the shards, the output schema
    and dimension, and the manifest header a rerun must match."""

    job: CorpusJob
    task: str | None
    max_length: int
    truncate_dim: int | None  # as given to encode (None: the model's full width)
    dim: int
    files: tuple[InputFile, ...]
    shards: tuple[Shard, ...]
    schema: pa.Schema
    header: dict

    def shards_for(self, index: int, count: int) -> list[Shard]:
        """The shards process `index` of `count` does: every count-th from `index`."""
        return [s for s in self.shards if s.index % count == index]

    @property
    def width(self) -> int:
        return embedding_width(self.dim, self.job.precision)

    def converters(self) -> list:
        """Per id/kept column: the function that makes a read value the column's type."""
        return [
            as_text if pa.types.is_string(f.type) else (lambda v: v) for f in list(self.schema)[:-1]
        ]


def _ranges_sha256(ranges) -> str | None:
    if ranges is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(ranges, np.float32).tobytes()).hexdigest()


def plan_job(model, job: CorpusJob) -> Plan:
    """Checks the job against the model, scans the inputs (row counts: Parquet metadata, a byte
    scan of text, JSONL and CSV files) and cuts them into shards."""
    if not job.inputs:
        raise ValueError("no inputs")
    if not isinstance(job.shard_rows, int) or job.shard_rows < 1:
        raise ValueError(f"shard_rows must be a positive integer, got {job.shard_rows!r}")
    check_columns(job.keep_fields)
    task = None if job.task is None else model.resolve_task(job.task)
    truncate_dim = model.config.truncate_dim if job.truncate_dim is None else job.truncate_dim
    max_length, dim = check_options(
        model,
        batch_size=1,
        max_length=job.max_length,
        truncate_dim=truncate_dim,
        max_tokens_per_batch=1,
        window=1,
        precision=job.precision,
        ranges=job.ranges,
        streaming=True,
    )
    fields = job.fields
    files = tuple(
        scan(path, name, fmt, fields, job.shard_rows)
        for path, name, fmt in expand(job.inputs, job.text_field)
    )
    shards, index = [], 0
    for i, f in enumerate(files):
        for start in range(0, f.rows, job.shard_rows):
            shards.append(Shard(index, i, start, min(start + job.shard_rows, f.rows)))
            index += 1

    def out_type(field):
        parquet = all(f.format == "parquet" for f in files)
        return column_type([f.arrow_types[field] for f in files] if parquet else None)

    schema = output_schema(
        dim,
        job.precision,
        pa.string() if job.id_field is None else out_type(job.id_field),
        [(k, out_type(k)) for k in job.keep_fields],
    )
    settings = {
        "jina_jax_version": __version__,
        "task": task,
        "prompt": job.prompt,
        "max_length": max_length,
        "truncate_dim": dim,
        "precision": job.precision,
        "dtype": np.dtype(model.dtype).name,
        "normalize": bool(job.normalize),
        "ranges_sha256": _ranges_sha256(job.ranges),
        "text_field": fields.text,
        "id_field": job.id_field,
        "keep_fields": list(job.keep_fields),
        "skip_empty": bool(job.skip_empty),
        "shard_rows": job.shard_rows,
    }
    header = {
        "model": model_fingerprint(model),
        "settings": settings,
        "inputs": [f.fingerprint() for f in files],
        "dim": dim,
        "schema": describe(schema),
        "arrow_schema": schema_record(schema),
        "plan": [s.to_json() for s in shards],
    }
    return Plan(job, task, max_length, truncate_dim, dim, files, tuple(shards), schema, header)


class ShardWriter:
    """One shard being written: rows are buffered a row group at a time into a temporary
    sibling of `part-<i>.parquet`; `commit` closes it, hashes it and renames it into place."""

    def __init__(self, folder: str, shard: Shard, plan: Plan):
        self.shard, self.plan, self.rows = shard, plan, 0
        self.path = os.path.join(folder, shard.file)
        self._stack = contextlib.ExitStack()
        self.tmp = self._stack.enter_context(atomic_path(self.path))
        names = plan.schema.names
        self._writer = pq.ParquetWriter(
            self.tmp,
            plan.schema,
            # float vectors do not compress: spend no time trying
            # (a {column: codec} dict, as pyarrow documents; its defaults read as `str` to checkers)
            compression={n: "none" if n == EMBEDDING_COLUMN else "snappy" for n in names},  # pyright: ignore[reportArgumentType]
            use_dictionary=names[1:-1],
            write_statistics=names[:-1],
        )
        self._vectors = np.empty((GROUP_ROWS, plan.width), EMBEDDING_DTYPES[plan.job.precision])
        self._columns = [[] for _ in names[:-1]]
        self._converters = plan.converters()

    def add(self, vector: np.ndarray, ident, kept: tuple) -> None:
        n = len(self._columns[0])
        self._vectors[n] = vector
        self._columns[0].append(ident)
        for column, value in zip(self._columns[1:], kept):
            column.append(value)
        self.rows += 1
        if n + 1 == GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        n = len(self._columns[0])
        arrays = [
            pa.array([convert(v) for v in column], type=field.type)
            for column, convert, field in zip(self._columns, self._converters, self.plan.schema)
        ]
        arrays.append(embedding_column(self._vectors[:n]))
        self._writer.write_table(
            pa.Table.from_arrays(arrays, schema=self.plan.schema), row_group_size=GROUP_ROWS
        )
        self._columns = [[] for _ in self._columns]

    def commit(self, skipped: int) -> dict:
        """Finishes the file and renames it into place; returns its manifest record."""
        if self._columns[0] or self.rows == 0:
            self._flush()
        self._writer.close()
        record = {
            "file": self.shard.file,
            "rows": self.rows,
            "skipped_empty": skipped,
            "bytes": os.path.getsize(self.tmp),
            "sha256": file_sha256(self.tmp),
        }
        self._stack.close()  # fsync, rename over part-<i>.parquet, fsync the folder
        return record

    def abort(self) -> None:
        """Drops the temporary file (after an error or an interruption)."""
        with contextlib.suppress(Exception):
            self._writer.close()
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def embed_shards(
    model,
    plan: Plan,
    folder: str,
    shards,
    *,
    batch_size: int = 32,
    max_tokens_per_batch: int = DEFAULT_TOKEN_BUDGET,
    window: int = DEFAULT_WINDOW,
    on_shard=None,
    on_rows=None,
    stats: Stats | None = None,
) -> None:
    """Embeds `shards` (of `plan`, in order) into `folder`, each written atomically, calling
    `on_shard(shard, record)` as each is in place (record: its manifest entry) and
    `on_rows(n)` as rows are done. One `iter_encode` stream runs over all of them."""
    job, fields = plan.job, plan.job.fields
    shards = list(shards)
    meta: collections.deque = collections.deque()  # (shard position, id, kept) per text
    ends: collections.deque = collections.deque()  # (rows, skipped) per shard read through

    def texts():
        for position, shard in enumerate(shards):
            file = plan.files[shard.input]
            rows = skipped = 0
            for row, text, ident, kept in read_rows(file, shard.start, shard.stop, fields):
                if text is None or not text.strip():
                    if not job.skip_empty:
                        what = "null" if text is None else "empty"
                        raise ValueError(
                            f"{file.name}:{row}: {what} text ({fields.text!r}); "
                            "--skip-empty leaves such rows out (counted)"
                        )
                    skipped += 1
                    continue
                if fields.id is None:
                    ident = default_id(file.name, row)
                elif ident is None:
                    raise ValueError(
                        f"{file.name}:{row}: the id ({fields.id!r}, --id-field) is null"
                    )
                meta.append((position, ident, kept))
                rows += 1
                yield text
            ends.append((rows, skipped))

    writer: ShardWriter | None = None
    position = pending = 0

    def settle():
        """Commits, in order, every shard whose rows are all written (empty ones included)."""
        nonlocal writer, position, pending
        while ends:
            rows, skipped = ends[0]
            if writer is None:
                writer = ShardWriter(folder, shards[position], plan)
            if writer.rows < rows:
                return
            ends.popleft()
            record = writer.commit(skipped)
            writer = None
            if on_rows is not None:
                on_rows(pending + skipped)
                pending = 0
            if on_shard is not None:
                on_shard(shards[position], record)
            position += 1

    try:
        vectors = model.iter_encode(
            texts(),
            task=plan.task,
            prompt=job.prompt,
            batch_size=batch_size,
            max_length=plan.max_length,
            truncate_dim=plan.truncate_dim,
            normalize=job.normalize,
            show_progress_bar=False,
            max_tokens_per_batch=max_tokens_per_batch,
            window=window,
            precision=job.precision,
            ranges=job.ranges,
            stats=stats,
        )
        for vector in vectors:
            settle()
            at, ident, kept = meta.popleft()
            if writer is None:
                writer = ShardWriter(folder, shards[position], plan)
            if at != position:  # the stream and the shards must never drift apart
                raise RuntimeError(
                    f"row of shard {shards[at].index} met shard {shards[position].index}"
                )
            writer.add(vector, ident, kept)
            pending += 1
            if pending == PROGRESS_EVERY and on_rows is not None:
                on_rows(pending)
                pending = 0
            settle()
        settle()
        if position != len(shards):
            raise RuntimeError(f"{len(shards) - position} shard(s) were not finished")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def shard_assignment(
    shard_index: int | None = None, shard_count: int | None = None
) -> tuple[int, int]:
    """(index, count) of this process: as given, else JAX's process index and count when
    `jax.distributed` is initialised with several processes, else (0, 1)."""
    if shard_index is None and shard_count is None:
        if jax.process_count() > 1:
            return jax.process_index(), jax.process_count()
        return 0, 1
    if shard_index is None or shard_count is None:
        raise ValueError("--shard-index and --shard-count go together")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"--shard-index must be in 0..{shard_count - 1}, got {shard_index}")
    return shard_index, shard_count


def _remove(folder: str, names) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))


def prepare_folder(
    folder: str, plan: Plan, index: int = 0, count: int = 1, overwrite: bool = False
) -> dict[int, list[dict]]:
    """Makes `folder` ready for process `index` of `count`: created if missing; refused if it
    holds other files, or (without `overwrite`) a manifest of other settings or inputs; with
    `overwrite`, what belongs to an older job is removed (one process: everything of ours; of
    several: the other manifests, shards outside the plan and this process's shards). This
    process's temporaries are removed. Returns {shard: records} the existing manifests hold."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise Refused(f"--output {folder} exists and is not a folder")
    os.makedirs(folder, exist_ok=True)
    entries = os.listdir(folder)
    foreign = sorted(e for e in entries if not OURS.match(e))
    if foreign:
        raise Refused(
            f"--output {folder} holds files jina-jax did not write ({foreign[0]}"
            f"{', ...' if len(foreign) > 1 else ''}); use an empty or new folder"
        )
    mine = {s.file for s in plan.shards_for(index, count)}
    own_manifest = process_manifest_name(index, count)
    if overwrite:
        if count == 1:
            _remove(folder, entries)
            return {}
        keep = []
        for path in manifest_paths(folder):
            try:
                same = difference(load_manifest(path).header, plan.header) is None
            except ValueError:
                same = False
            (keep.append(path) if same else _remove(folder, [os.path.basename(path)]))
        planned = {s.file for s in plan.shards}
        _remove(
            folder,
            [e for e in entries if e.startswith("part-") and (e not in planned or e in mine)],
        )
        existing = [load_manifest(p) for p in keep if os.path.exists(p)]
    else:
        existing = read_manifests(folder)
        for m in existing:
            diff = difference(m.header, plan.header)
            if diff:
                raise Refused(
                    f"--output {folder} holds a dataset made differently: {diff}; "
                    "add --overwrite to start over"
                )
    temporaries = [
        e
        for e in entries
        if e.startswith(".")
        and (count == 1 or e.startswith(tuple(f".{n}.tmp-" for n in (*mine, own_manifest))))
    ]
    _remove(folder, temporaries)
    return candidates(existing)


def finalize(folder: str, header: dict, count: int) -> Manifest:
    """Under the folder's lock: the merged view of every manifest; once every shard of the plan
    is done, written as manifest.json and the per-process manifests removed."""
    with folder_lock(folder):
        paths = manifest_paths(folder)
        merged: dict[int, dict] = {}
        for shard, records in candidates([load_manifest(p) for p in paths]).items():
            record = records[0] if len(records) == 1 else check_shard(folder, records)
            if record is not None:
                merged[shard] = record
        manifest = Manifest(header, merged, 0, 1, __version__)
        if manifest.complete:
            if count > 1 or len(paths) > 1:
                manifest.write(folder, MANIFEST)
            _remove(folder, [os.path.basename(p) for p in paths if os.path.basename(p) != MANIFEST])
            _remove(
                folder,
                [
                    os.path.basename(p)
                    for p in glob.glob(os.path.join(glob.escape(folder), ".manifest*.json.tmp-*"))
                ],
            )
        return manifest


@dataclasses.dataclass
class Summary:
    """What a run did: rows embedded now (and empty texts left out), its shards written and
    already complete, the dataset's state after it, and the batches' padding and shapes."""

    folder: str
    dim: int
    rows: int
    skipped_empty: int
    shards_written: int
    shards_skipped: int
    shards_total: int
    shards_done: int
    dataset_rows: int
    padding: float
    tokens: int
    compiles: int
    loaded: int
    seconds: float
    process: tuple[int, int] = (0, 1)

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total

    def line(self) -> str:
        empty = f", {self.skipped_empty} empty text(s) skipped" if self.skipped_empty else ""
        who = f" (process {self.process[0]} of {self.process[1]})" if self.process[1] > 1 else ""
        state = (
            f"complete: {self.dataset_rows} row(s) [{self.dataset_rows}, {self.dim}]"
            if self.complete
            else f"{self.shards_done} of {self.shards_total} shard(s) "
            "done (the other processes' shards, or a rerun, finish it)"
        )
        rate = f", {self.rows / self.seconds:.1f} rows/s" if self.seconds > 0 and self.rows else ""
        return (
            f"embedded {self.rows} row(s){who} in {self.seconds:.1f} s{rate}: "
            f"{self.shards_written} shard(s) written, {self.shards_skipped} already complete"
            f"{empty} -> {self.folder} {state}; padding {100 * self.padding:.1f}%; "
            f"{self.compiles} shape(s), {self.loaded} from the compilation cache"
        )


def open_job(
    model, job: CorpusJob, output: str, index: int = 0, count: int = 1, overwrite: bool = False
) -> tuple[Plan, str, Manifest, list[Shard]]:
    """Where a run starts: the plan, the output folder (absolute, made ready by
    `prepare_folder`), process `index`'s manifest holding its shards that are already complete
    (written out), and its shards still to do, in plan order."""
    plan = plan_job(model, job)
    folder = os.path.abspath(output)
    existing = prepare_folder(folder, plan, index, count, overwrite)
    manifest = Manifest(plan.header, {}, index, count, __version__)
    todo = []
    for shard in plan.shards_for(index, count):
        record = check_shard(folder, existing.get(shard.index, []))
        if record is None:
            todo.append(shard)
        else:
            manifest.shards[shard.index] = record
    manifest.write(folder)
    return plan, folder, manifest, todo


def embed_corpus(
    model,
    job: CorpusJob,
    output: str,
    *,
    batch_size: int = 32,
    shard_index: int | None = None,
    shard_count: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    log=sys.stderr,
    max_tokens_per_batch: int = DEFAULT_TOKEN_BUDGET,
    window: int = DEFAULT_WINDOW,
) -> Summary:
    """Runs (or resumes) `job` into the folder `output` (see the module docstring). progress:
    a tqdm bar on stderr (None: when stderr is a terminal); `log`: where the "compiling
    shapes" line goes (None: nowhere). Returns the `Summary`."""
    start_time = time.perf_counter()
    index, count = shard_assignment(shard_index, shard_count)
    plan, folder, manifest, todo = open_job(model, job, output, index, count, overwrite)
    mine = plan.shards_for(index, count)

    stats = Stats()
    show = sys.stderr.isatty() if progress is None else progress
    done_rows = sum(s.rows for s in mine if s.index in manifest.shards)
    bar = tqdm(
        total=sum(s.rows for s in mine),
        initial=done_rows,
        disable=not show,
        file=sys.stderr,
        unit="row",
        desc="embed",
        dynamic_ncols=True,
    )
    counts = {"rows": 0, "skipped": 0}

    def on_shard(shard, record):
        manifest.shards[shard.index] = record
        manifest.write(folder)
        counts["rows"] += record["rows"]
        counts["skipped"] += record["skipped_empty"]

    def on_rows(n):
        bar.update(n)
        elapsed = time.perf_counter() - start_time
        if elapsed > 0:
            bar.set_postfix_str(f"{stats.tokens / elapsed:,.0f} tok/s", refresh=False)

    with bar:
        if todo and log is not None and model.compile_count == 0:
            message = (
                "compiling shapes as the first batches meet them (later runs load "
                "them from the compilation cache) ..."
            )
            bar.write(message, file=log) if show else print(message, file=log, flush=True)
        batching = dict(
            batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch, window=window
        )
        embed_shards(
            model, plan, folder, todo, on_shard=on_shard, on_rows=on_rows, stats=stats, **batching
        )
    counts.update(tokens=stats.tokens, padded=stats.padded, compiles=model.compile_count)
    counts["loaded"] = model.forward.loaded_count
    return finish_run(plan, folder, todo, len(mine), counts, start_time, (index, count))


def finish_run(plan, folder, todo, offered, counts, start_time, process=(0, 1)) -> Summary:
    """Finalizes the folder (`finalize`) and says what the run did: `offered` shards were this
    process's, `todo` of them made now; `counts`: rows, skipped (empty texts), tokens, padded,
    compiles, loaded. Both engines end here."""
    merged = finalize(folder, plan.header, process[1])
    tokens = counts["tokens"]
    return Summary(
        folder=folder + os.sep,
        dim=plan.dim,
        rows=counts["rows"],
        skipped_empty=counts["skipped"],
        shards_written=len(todo),
        shards_skipped=offered - len(todo),
        shards_total=len(plan.shards),
        shards_done=len(merged.shards),
        dataset_rows=sum(r["rows"] for r in merged.shards.values()),
        padding=counts["padded"] / tokens - 1.0 if tokens else 0.0,
        tokens=tokens,
        compiles=counts["compiles"],
        loaded=counts["loaded"],
        seconds=time.perf_counter() - start_time,
        process=process,
    )
