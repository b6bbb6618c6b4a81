"""Embedding in an Apache Beam pipeline (the `[beam]` extra): a `ModelHandler` for
`RunInference`, and a writer of the corpus job's Parquet columns.

    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from jina_jax.data.beam import JinaModelHandler, WriteEmbeddings

    handler = JinaModelHandler("/models/jina-v3", task="retrieval.passage", id_field="doc_id",
                               keep_fields=("title",), batch_rows=256)
    with beam.Pipeline() as p:
        (p | beam.io.ReadFromParquet("corpus/*.parquet")     # dicts: doc_id, text, title, ...
           | beam.Reshuffle()                                 # one file is one bundle: spread it
           | RunInference(handler)                            # dicts: id, title, embedding
           | WriteEmbeddings("embedded/", handler))           # part-00000-of-00004.parquet, ...

Elements, each a row with its id, so ids travel with the rows:
- a row (a dict, or a `beam.Row`): comes back as a dict of the corpus job's columns
  (`schema.py`): `id` (the row's `id_field`), the `keep_fields` in order, `embedding` (a numpy
  [W] vector: float32, or int8/uint8 for the quantised precisions);
- a `(key, text)` pair: comes back as `(key, vector)`.
A text that is not a string, a missing field or an unknown task (`task_field`) fails the bundle
with an error naming the row's id.

The model is loaded once per worker process (`load_model`, through Beam's shared handle; with
`share_model=True` once per machine, for a large model on one accelerator), from a path or hub
id, never pickled weights. Batches are of `min_batch_rows` to `batch_rows` rows (Beam's
`BatchElements`; within one, encode sorts by length and pads to its fixed shapes, so a
worker compiles the same shapes whatever the batch size Beam picks).

`WriteEmbeddings` writes the rows with the corpus job's Parquet schema (`output_schema`:
same columns, types and embedding type; ids and kept fields as strings, or with `id_type` /
`kept_types`), as `part-SSSSS-of-NNNNN.parquet` files through Beam's own sink (temporary
files renamed at the end). It writes no manifest: `open_dataset` refuses the folder; read it
with `pyarrow.dataset`, polars or DuckDB (`part-*.parquet`), or use `jina-jax embed` for a
resumable folder.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .arrow import pa
from .schema import (
    EMBEDDING_COLUMN,
    ID_COLUMN,
    check_columns,
    embedding_column,
    output_schema,
)
from .worker import BatchEncoder

# (ignores: Beam lives in its own environment, so the type check of the main one cannot see it)
try:
    import apache_beam as beam  # pyright: ignore[reportMissingImports]
    from apache_beam.io.parquetio import WriteToParquetBatched  # pyright: ignore[reportMissingImports]
    from apache_beam.ml.inference.base import ModelHandler  # pyright: ignore[reportMissingImports]
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"embedding in a Beam pipeline needs apache-beam: pip install 'jina-jax[beam]' ({e})"
    ) from None

DEFAULT_BATCH_ROWS = 1024  # most rows per RunInference batch


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _as_mapping(element):
    if isinstance(element, Mapping):
        return element
    if hasattr(element, "_asdict"):  # beam.Row, a NamedTuple
        return element._asdict()
    return None


class JinaModelHandler(ModelHandler):
    """`RunInference(JinaModelHandler(model, ...))`: rows (or `(key, text)` pairs) in, rows
    with their embedding out (see the module docstring).

    model: checkpoint folder or hub id (loaded once per worker). text_field, id_field,
    keep_fields: the row's text, its id (default "id") and the fields carried into the output
    (as `jina-jax embed`'s --text-field, --id-field, --keep-fields). task: one adapter for
    every row (None: no adapter), or task_field: the field naming each row's task. The other
    options are `worker.BatchEncoder`'s (prompt, max_length, truncate_dim, normalize, precision,
    ranges, batch_size, max_tokens_per_batch as `encode`; dtype; shard), checked by name when
    the handler is made (an unknown one is a TypeError) and by value when the model is loaded. batch_rows / min_batch_rows: the most / fewest rows
    Beam puts in one batch (default: batch_rows both, so full batches but the last of a
    bundle); max_batch_duration_secs: how long a streaming pipeline waits to fill one.
    share_model: one model per machine for every worker process (Beam's
    `share_model_across_processes`).
    """

    def __init__(
        self,
        model: str,
        *,
        text_field: str = "text",
        id_field: str = ID_COLUMN,
        keep_fields: Sequence[str] = (),
        task_field: str | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        min_batch_rows: int | None = None,
        max_batch_duration_secs: int | None = None,
        share_model: bool = False,
        **options,
    ):
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(
                f"model must be a checkpoint path or hub id (loaded once per worker), "
                f"got {type(model).__name__}"
            )
        if options.get("task") is not None and task_field is not None:
            raise ValueError("give task or task_field, not both")
        # an unknown option is a TypeError here, when the pipeline is built, not on a worker
        inspect.signature(BatchEncoder).bind(model, **options)
        keep_fields = tuple(keep_fields)
        check_columns(keep_fields)
        _positive("batch_rows", batch_rows)
        min_batch_rows = batch_rows if min_batch_rows is None else min_batch_rows
        if _positive("min_batch_rows", min_batch_rows) > batch_rows:
            raise ValueError(
                f"min_batch_rows ({min_batch_rows}) is more than batch_rows ({batch_rows})"
            )
        super().__init__(
            min_batch_size=min_batch_rows,
            max_batch_size=batch_rows,
            max_batch_duration_secs=max_batch_duration_secs,
        )
        self.model = str(model)
        self.text_field, self.id_field, self.keep_fields = text_field, id_field, keep_fields
        self.task_field = task_field
        self.share_model = share_model
        self.encoder_options = options

    # --- Beam's ModelHandler protocol ------------------------------------------------------

    def load_model(self) -> BatchEncoder:
        """Once per worker process (or machine, with share_model): the model and its checked
        options."""
        return BatchEncoder(self.model, **self.encoder_options)

    def share_model_across_processes(self) -> bool:
        return self.share_model

    def get_metrics_namespace(self) -> str:
        return "jina_jax"

    def run_inference(self, batch: Sequence, model: BatchEncoder, inference_args=None) -> list:
        if inference_args:
            raise ValueError(
                f"JinaModelHandler takes no inference_args, got {sorted(inference_args)}"
            )
        rows = [self._split(element, i) for i, element in enumerate(batch)]
        ids = [r[0] for r in rows]
        texts = [r[1] for r in rows]
        tasks = None
        if self.task_field is not None:
            tasks = model.resolve_tasks(
                [r[2].get(self.task_field) for r in rows], ids, f"{self.task_field!r} (task_field)"
            )
        vectors = model.encode(texts, tasks, ids, f"{self.text_field!r} (text_field)")
        return [self._output(row, vector) for row, vector in zip(rows, vectors)]

    # --- rows ------------------------------------------------------------------------------

    def _split(self, element, index: int):
        """(id, text, row or None, is_row) of one element; errors name its id."""
        row = _as_mapping(element)
        if row is None:
            if isinstance(element, tuple) and len(element) == 2:
                if self.task_field is not None:
                    raise ValueError(
                        f"element {index} of the batch (key {element[0]!r}): a (key, text) "
                        "pair has no task field: give rows (dicts) with task_field"
                    )
                return element[0], element[1], {}, False
            raise TypeError(
                f"element {index} of the batch: a row (dict, beam.Row) or a (key, text) "
                f"pair, got {type(element).__name__}"
            )
        if self.id_field not in row:
            raise ValueError(
                f"element {index} of the batch: no field {self.id_field!r} (id_field); "
                f"the row has {sorted(row)}"
            )
        ident = row[self.id_field]
        if ident is None:
            raise ValueError(f"element {index} of the batch: the id ({self.id_field!r}) is null")
        for name, what in ((self.text_field, "text_field"), (self.task_field, "task_field")):
            if name is not None and name not in row:
                raise ValueError(
                    f"id {ident!r}: no field {name!r} ({what}); the row has {sorted(row)}"
                )
        missing = [name for name in self.keep_fields if name not in row]
        if missing:
            raise ValueError(
                f"id {ident!r}: no field {missing[0]!r} (keep_fields); the row has {sorted(row)}"
            )
        return ident, row[self.text_field], row, True

    def _output(self, row, vector: np.ndarray):
        ident, _, fields, is_row = row
        if not is_row:
            return ident, vector
        out = {ID_COLUMN: ident}
        out.update((name, fields[name]) for name in self.keep_fields)
        out[EMBEDDING_COLUMN] = vector
        return out

    def output_schema(
        self,
        dim: int,
        id_type: pa.DataType | None = None,
        kept_types: Mapping[str, pa.DataType] | None = None,
    ) -> pa.Schema:
        """The corpus job's schema of these rows at output dimension `dim` (the model's
        truncated width): ids and kept fields strings unless typed here."""
        kept_types = dict(kept_types or {})
        unknown = sorted(set(kept_types) - set(self.keep_fields))
        if unknown:
            raise ValueError(f"kept_types names {unknown}, not in keep_fields")
        return output_schema(
            dim,
            self.encoder_options.get("precision", "float32"),
            pa.string() if id_type is None else id_type,
            [(name, kept_types.get(name, pa.string())) for name in self.keep_fields],
        )


class _ToTables(beam.DoFn):
    """Batches of output rows -> pyarrow Tables of `schema`, the embedding column built from
    numpy (no Python lists of floats)."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema

    def process(self, rows):
        columns = {}
        for field in self.schema:
            if field.name == EMBEDDING_COLUMN:
                vectors = np.stack([r[EMBEDDING_COLUMN] for r in rows])
                width = field.type.list_size
                value_type = pa.from_numpy_dtype(vectors.dtype)
                if vectors.shape[1] != width or value_type != field.type.value_type:
                    raise ValueError(
                        f"embeddings are {vectors.dtype} [{vectors.shape[1]}], the schema "
                        f"says {field.type} (give output_schema the output dimension)"
                    )
                columns[field.name] = embedding_column(vectors)
            else:
                values = [r[field.name] for r in rows]
                try:
                    columns[field.name] = pa.array(values, type=field.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise ValueError(
                        f"{field.name!r}: the rows' values are not {field.type} ({e}); "
                        "give its type (id_type / kept_types)"
                    ) from None
        yield pa.Table.from_arrays(list(columns.values()), schema=self.schema)


class WriteEmbeddings(beam.PTransform):
    """Output rows of `JinaModelHandler` -> `folder/part-SSSSS-of-NNNNN.parquet` with the
    corpus job's schema (see the module docstring).

    folder: created if missing; one holding files is refused unless overwrite=True (Beam's
    sink replaces files of the same names). dim: the output dimension (truncate_dim, else the
    model's hidden size; for binary/ubinary the unpacked dimension). id_type, kept_types: the
    Arrow types of the id and kept columns (default string). rows_per_table: rows per Arrow
    table handed to the sink (one Parquet row group each). num_shards: output files (0:
    Beam decides)."""

    def __init__(
        self,
        folder: str,
        handler: JinaModelHandler,
        dim: int,
        *,
        id_type: pa.DataType | None = None,
        kept_types: Mapping[str, pa.DataType] | None = None,
        rows_per_table: int = 4096,
        num_shards: int = 0,
        overwrite: bool = False,
    ):
        super().__init__()
        self.folder = os.fspath(folder)
        self.schema = handler.output_schema(_positive("dim", dim), id_type, kept_types)
        self.rows_per_table = _positive("rows_per_table", rows_per_table)
        self.num_shards = num_shards
        if os.path.isdir(self.folder) and os.listdir(self.folder) and not overwrite:
            raise FileExistsError(
                f"{self.folder}: the folder holds files; overwrite=True replaces what Beam "
                "writes there"
            )

    def expand(self, rows):
        os.makedirs(self.folder, exist_ok=True)
        return (
            rows
            | "Batch"
            >> beam.BatchElements(
                min_batch_size=self.rows_per_table, max_batch_size=self.rows_per_table
            )
            | "ToTables" >> beam.ParDo(_ToTables(self.schema))
            | "Write"
            >> WriteToParquetBatched(
                os.path.join(self.folder, "part"),
                schema=self.schema,
                file_name_suffix=".parquet",
                shard_name_template="-SSSSS-of-NNNNN",
                num_shards=self.num_shards,
                # lists as Parquet's spec names them ("element"), as the corpus job writes
                use_compliant_nested_type=True,
            )
        )
