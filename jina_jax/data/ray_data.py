"""Embedding on a Ray cluster (the `[ray]` extra, `ray[data]`): a callable class for Ray Data's
`map_batches`, a one-call helper with the defaults that work, and the corpus job of `job.py`
with its shards spread over Ray actors.

    ds = ray.data.read_parquet("s3://bucket/corpus/")
    ds = embed_dataset(ds, "/models/jina-v3", task="retrieval.passage", actors=8, num_gpus=1)
    ds.write_parquet("s3://bucket/embedded/")      # id, text, ..., embedding

    embed_corpus_ray("/models/jina-v3", CorpusJob(inputs=("corpus/",)), "out/", actors=8)

`RayEmbedder` loads the model once per actor (from a path or hub id, never weights passed
through the object store: a constructor argument of that size can break actor restarts) and
turns each batch (a pyarrow Table, a dict of numpy arrays or a pandas DataFrame) into the same
batch plus the embedding column, `fixed_size_list<float32>[D]` built from numpy
(`schema.embedding_column`; int8/uint8 for the quantised precisions), equal to `encode()` of
the same texts.

`embed_corpus_ray` plans the job on the driver exactly as `embed_corpus` does (same shards,
same files, same manifest: one dataset looks the same whichever way it was made, and either
engine resumes the other's folder); a Ray task is a run of consecutive shards of up to one
encode window (`group_shards`), run by an actor that reads their rows, embeds them in one
stream as the local job does and writes each `part-<i>.parquet` atomically, and the driver
records them in the manifest as the task comes back (each shard's record says
`"engine": "ray"`). Inputs and output must be on a file
system every node sees (one machine, NFS, a mounted bucket).

Pitfalls met on a 2-CPU machine (ray 2.60), and what the defaults do about them:
- actors asking `num_cpus=1` each on a 2-CPU cluster leave no CPU for the read tasks: the job
  hangs with no error. Actors ask `num_cpus=0.5` unless told otherwise.
- a small file is one block, so one actor does everything: `embed_dataset` cuts blocks to
  `batch_rows` rows (a streaming repartition).
- each actor's XLA client uses every core of its node: on CPU nodes run one actor per node.
- Ray Data retries forever by default (`max_restarts=-1`): a batch that always kills its actor
  (out of memory) would loop. The helpers restart an actor and retry a task `retries` times.
- Ray 2.59+ turns token authentication on and keeps the token in `~/.ray/auth_token`; a driver
  connecting with `address=` needs the cluster's token.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np

from ..encode import DEFAULT_TOKEN_BUDGET, DEFAULT_WINDOW, Stats
from .arrow import pa
from .job import OURS, CorpusJob, Summary, embed_shards, finish_run, open_job
from .manifest import model_fingerprint
from .schema import EMBEDDING_COLUMN, embedding_column
from .worker import BatchEncoder, load_model

try:
    import ray
    import ray.data
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"embedding on Ray needs ray[data]: pip install 'jina-jax[ray]' ({e})"
    ) from None

ENGINE = "ray"
DEFAULT_NUM_CPUS = 0.5  # per actor: leaves CPUs to the read tasks (see the pitfalls)
DEFAULT_RETRIES = 3  # actor restarts and task retries after an actor dies
DEFAULT_BATCH_ROWS = 1024  # rows per Ray batch (encode sorts and pads within one)


class RayEmbedder:
    """For `ds.map_batches(RayEmbedder, fn_constructor_kwargs={"model": ...}, ...)`: one model
    per actor; each batch comes back with the embedding column added.

    model: checkpoint folder or hub id (loaded in the actor). text_column: the texts (strings;
    a null is an error naming the row, and its id when `id_column` is given). task: one adapter
    for every row (None: no adapter), or task_column: a column naming each row's task (a null
    there: no adapter). The other options are `worker.BatchEncoder`'s: prompt, max_length,
    truncate_dim, normalize, precision, ranges, batch_size, max_tokens_per_batch as `encode`;
    dtype, the compute dtype; shard, data parallel over the actor's devices (default: when it
    sees more than one); an unknown one is a TypeError.
    embedding_column: the new column's name (an existing column of that name is an error).
    """

    def __init__(
        self,
        model: str,
        *,
        text_column: str = "text",
        task_column: str | None = None,
        id_column: str | None = None,
        embedding_column: str = EMBEDDING_COLUMN,
        **options,
    ):
        if options.get("task") is not None and task_column is not None:
            raise ValueError("give task or task_column, not both")
        self.encoder = BatchEncoder(model, **options)  # task, prompt, ... as `BatchEncoder`
        self.model = self.encoder.model
        self.text_column, self.task_column, self.id_column = text_column, task_column, id_column
        self.column = embedding_column

    def __call__(self, batch):
        columns = _columns(batch)
        if self.column in columns:
            raise ValueError(
                f"the batch already has a column {self.column!r} "
                "(embedding_column names the new one)"
            )
        for name, what in (
            (self.text_column, "text_column"),
            (self.task_column, "task_column"),
            (self.id_column, "id_column"),
        ):
            if name is not None and name not in columns:
                raise ValueError(f"no column {name!r} ({what}); the batch has {columns}")
        texts = _values(batch, self.text_column)
        ids = None if self.id_column is None else _values(batch, self.id_column)
        tasks = None
        if self.task_column is not None:
            tasks = self.encoder.resolve_tasks(
                _values(batch, self.task_column), ids, f"{self.task_column!r} (task_column)"
            )
        vectors = self.encoder.encode(texts, tasks, ids, f"{self.text_column!r} (text_column)")
        return _with_column(batch, self.column, embedding_column(vectors))


def _columns(batch) -> list[str]:
    if isinstance(batch, pa.Table):
        return batch.column_names
    if isinstance(batch, Mapping):
        return list(batch)
    if hasattr(batch, "columns"):  # pandas.DataFrame
        return [str(c) for c in batch.columns]
    raise TypeError(
        f"a batch is a pyarrow Table, a dict of arrays or a pandas DataFrame, got "
        f"{type(batch).__name__}"
    )


def _values(batch, name: str) -> list:
    """A column as Python values (the texts go to the tokenizer as str anyway)."""
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist()
    column = batch[name]
    values = column.tolist() if hasattr(column, "tolist") else list(column)
    # pandas and numpy object arrays hold NaN/None for nulls: make them None
    return [None if isinstance(v, float) and v != v else v for v in values]


def _with_column(batch, name: str, column: pa.FixedSizeListArray):
    if isinstance(batch, pa.Table):
        return batch.append_column(pa.field(name, column.type, nullable=False), column)
    if isinstance(batch, Mapping):  # Ray turns an Arrow array in a dict batch into the column
        return {**batch, name: column}
    import pandas as pd  # a pandas batch exists, so pandas does

    return batch.assign(
        **{name: pd.Series(pd.arrays.ArrowExtensionArray(column), index=batch.index)}
    )


def _remote_args(num_cpus, num_gpus, resources, retries: int, runtime_env) -> dict:
    args = {
        "num_cpus": DEFAULT_NUM_CPUS if num_cpus is None else num_cpus,
        "max_restarts": retries,
        "max_task_retries": retries,
    }
    if num_gpus:
        args["num_gpus"] = num_gpus
    if resources:
        args["resources"] = dict(resources)
    if runtime_env:
        args["runtime_env"] = runtime_env
    return args


def embed_dataset(
    ds,
    model: str,
    *,
    text_column: str = "text",
    actors: int = 1,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: Mapping | None = None,
    retries: int = DEFAULT_RETRIES,
    repartition: bool = True,
    runtime_env: dict | None = None,
    **options,
):
    """`ds` with the embedding column added (lazy, like every Ray Data transform).

    actors: the actor pool's size (one model each). batch_rows: rows per Ray batch and, with
    repartition, the most rows per block (so a small input still spreads over the actors).
    num_cpus (default 0.5), num_gpus, resources (e.g. {"TPU": 4}): what each actor asks.
    retries: how often a dead actor is restarted and its task retried. runtime_env: e.g.
    {"env_vars": {"JAX_PLATFORMS": "tpu"}}. options: `RayEmbedder`'s (task, prompt,
    max_length, truncate_dim, precision, dtype, ...). Rows come in no particular order: carry
    an id column."""
    for name, value in (("actors", actors), ("batch_rows", batch_rows)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if repartition:
        ds = ds.repartition(target_num_rows_per_block=batch_rows)
    return ds.map_batches(
        RayEmbedder,
        fn_constructor_kwargs={"model": str(model), "text_column": text_column, **options},
        batch_size=batch_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        **_remote_args(num_cpus, num_gpus, resources, retries, runtime_env),
    )


# --- the corpus job on Ray ----------------------------------------------------------------


class ShardEmbedder:
    """One actor of `embed_corpus_ray`: loads the model, checks it is the one the driver
    planned with, and for each shard index of a batch writes that shard (`embed_shards`)."""

    def __init__(
        self,
        model: str,
        plan,
        folder: str,
        dtype: str,
        batch_size: int,
        max_tokens_per_batch: int,
        shard: bool | None = None,
    ):
        self.created = time.time()  # wall clock: compared across processes by `timeline`
        self.model = load_model(model, dtype, shard)
        mine, planned = model_fingerprint(self.model), plan.header["model"]
        if any(mine[k] != planned[k] for k in planned if k.endswith("_sha256")):
            raise ValueError(
                f"{model}: the checkpoint this node reads differs from the "
                "driver's (config, weights or tokenizer)"
            )
        self.plan, self.folder = plan, folder
        self.batch_size, self.max_tokens_per_batch = batch_size, max_tokens_per_batch
        self.ready = time.time()

    def __call__(self, batch: dict) -> dict:
        """batch["shards"]: tasks, each a list of consecutive shard indices embedded in one
        stream (`group_shards`). One output row per shard; a task's token counts, compiles
        and loads go on its last shard's row."""
        out = {k: [] for k in ("shard", "record", "tokens", "padded", "compiles", "loaded")}
        out["timing"] = []
        node = ray.get_runtime_context().get_node_id()
        for indices in batch["shards"]:
            self._task([int(i) for i in indices], out, node)
        objects = ("record", "timing")
        return {k: np.array(v, dtype=object if k in objects else None) for k, v in out.items()}

    def _task(self, indices: list[int], out: dict, node: str) -> None:
        """One task's shards in one `embed_shards` stream, their rows appended to `out`."""
        stats, last = Stats(), [time.time()]
        compiles, loaded = self.model.compile_count, self.model.forward.loaded_count

        def on_shard(shard, record):
            out["shard"].append(shard.index)
            engine = {"name": ENGINE, "version": ray.__version__, "node": node}
            out["record"].append({**record, "engine": engine})
            now = time.time()
            out["timing"].append(
                {
                    "pid": os.getpid(),
                    "actor_created": self.created,
                    "actor_ready": self.ready,
                    "started": last[0],
                    "finished": now,
                }
            )
            last[0] = now
            for key in ("tokens", "padded", "compiles", "loaded"):
                out[key].append(0)

        embed_shards(
            self.model,
            self.plan,
            self.folder,
            [self.plan.shards[i] for i in indices],
            batch_size=self.batch_size,
            max_tokens_per_batch=self.max_tokens_per_batch,
            stats=stats,
            on_shard=on_shard,
        )
        out["tokens"][-1], out["padded"][-1] = stats.tokens, stats.padded
        out["compiles"][-1] = self.model.compile_count - compiles
        out["loaded"][-1] = self.model.forward.loaded_count - loaded


def group_shards(todo, actors: int, window: int = DEFAULT_WINDOW) -> list[list[int]]:
    """The shards to do as Ray tasks: runs of consecutive shards of at most `window` rows
    together (one shard alone when it is bigger), each embedded in one stream as the local job
    embeds a window, so the actor's batches, and the shapes it compiles or loads from the
    cache, are the local job's, and it does not drain its pipeline at every small shard; but
    never fewer tasks than `actors` (while there are shards enough)."""
    most = max(1, -(-len(todo) // actors))  # shards per task at most
    groups, rows = [], 0
    for shard in todo:
        size = shard.stop - shard.start
        if (
            groups
            and len(groups[-1]) < most
            and rows + size <= window
            and groups[-1][-1] + 1 == shard.index
        ):
            groups[-1].append(shard.index)
            rows += size
        else:
            groups.append([shard.index])
            rows = size
    return groups


def _remove_temporaries(folder: str) -> None:
    """Temporary shard files of actors that died mid-shard (their task was retried)."""
    for name in os.listdir(folder):
        if name.startswith(".part-") and OURS.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))


def embed_corpus_ray(
    model,
    job: CorpusJob,
    output: str,
    *,
    checkpoint: str | None = None,
    batch_size: int = 32,
    actors: int = 1,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: Mapping | None = None,
    retries: int = DEFAULT_RETRIES,
    runtime_env: dict | None = None,
    overwrite: bool = False,
    log=sys.stderr,
    max_tokens_per_batch: int = DEFAULT_TOKEN_BUDGET,
    timeline: list | None = None,
) -> Summary:
    """`embed_corpus` with its shards as Ray tasks (Ray must be initialised: `ray.init(...)`).

    model: the loaded model the driver plans with (its fingerprint goes into the manifest);
    checkpoint: what each actor loads (default `model.source`; a hub id resolves on each node),
    in the model's dtype; each actor checks it has the same config, weights and tokenizer.
    The folder is the one `embed_corpus` writes; a rerun after the driver died skips the
    shards the manifest holds. Returns the same `Summary`.

    timeline: a list to append one dict per shard written to, for measuring where the time
    goes (wall-clock `time.time()` seconds): {"shard", "rows", "pid" (the actor's),
    "actor_created", "actor_ready" (its model loaded and checked), "started", "finished" (the
    shard in the actor), "recorded" (in the manifest, on the driver), "submitted" (the
    pipeline started)}."""
    start_time = time.perf_counter()
    if not ray.is_initialized():
        raise RuntimeError("call ray.init(...) first (address= for an existing cluster)")
    if jax.process_count() > 1:  # several drivers would race on one folder
        raise ValueError(
            "embed_corpus_ray is one driver for the whole cluster; with "
            "jax.distributed use embed_corpus in each process"
        )
    for name, value in (("actors", actors), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    checkpoint = str(model.source if checkpoint is None else checkpoint)
    plan, folder, manifest, todo = open_job(model, job, output, overwrite=overwrite)
    counts = dict.fromkeys(("rows", "skipped", "tokens", "padded", "compiles", "loaded"), 0)
    if todo:
        if log is not None:
            print(
                f"ray: {len(todo)} shard(s) over {actors} actor(s) on "
                f"{len(ray.nodes())} node(s) ...",
                file=log,
                flush=True,
            )
        groups = group_shards(todo, actors)
        tasks = ray.data.from_items(
            [{"shards": g} for g in groups], override_num_blocks=len(groups)
        )
        done = tasks.map_batches(
            ShardEmbedder,
            fn_constructor_kwargs=dict(
                model=checkpoint,
                plan=plan,
                folder=folder,
                dtype=np.dtype(model.dtype).name,
                batch_size=batch_size,
                max_tokens_per_batch=max_tokens_per_batch,
            ),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            **_remote_args(num_cpus, num_gpus, resources, retries, runtime_env),
        )
        submitted = time.time()
        for row in done.iter_rows():  # as shards finish: the manifest grows with them
            manifest.shards[int(row["shard"])] = row["record"]
            manifest.write(folder)
            if timeline is not None:
                timeline.append(
                    {
                        "shard": int(row["shard"]),
                        "rows": row["record"]["rows"],
                        **row["timing"],
                        "submitted": submitted,
                        "recorded": time.time(),
                    }
                )
            counts["rows"] += row["record"]["rows"]
            counts["skipped"] += row["record"]["skipped_empty"]
            for key in ("tokens", "padded", "compiles", "loaded"):
                counts[key] += int(row[key])
        _remove_temporaries(folder)
    return finish_run(plan, folder, todo, len(plan.shards), counts, start_time)
