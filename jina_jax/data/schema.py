"""The layout of an embedded corpus: what `jina-jax embed --output FOLDER/` writes and
`jina_jax.open_dataset` reads.

    FOLDER/
      part-00000.parquet    a shard: a contiguous range of rows of one input file
      part-00001.parquet    ...
      manifest.json         the settings, the input files, the shard plan and, per finished
                            shard, its rows and its sha256 (see `manifest.py`)
      manifest.00001-of-00004.json   one per process while several share the folder
                                     (`--shard-count`), merged into manifest.json at the end

Columns of every shard, in this order (the same schema in every shard of a folder):
  id         --id-field's value, else `default_id(input name, row)` = "<input name>:<row>"
  <kept>     the --keep-fields, in the order given
  embedding  fixed_size_list<float32>[D]            precision float32 (the default)
             fixed_size_list<int8>[D] / <uint8>[D]   int8 / uint8 (quantised as `encode`)
             fixed_size_list<int8>[W] / <uint8>[W]   binary / ubinary: D bits packed, W = ceil(D/8)
Built from a numpy [N, W] array without Python lists (`embedding_column`), read back without a
copy (`embedding_matrix`).

Types of the id and kept columns (`column_type`): a Parquet column's own Arrow type when every
input is Parquet and all agree on it; otherwise string: strings as they are, other values as
their JSON text (ints `17`, lists `[1, 2]`), null stays null.

Rows: a shard's rows are in input order, the shards in plan order (input files sorted by name,
then by row), so the concatenation of the shards is the corpus in input order; exactly one row
per input row (an empty text is an error, or with --skip-empty left out and counted). Ids are
carried as given: duplicates across a corpus are not checked.

Input name (in default ids and errors): the file's path relative to the root of its input spec:
the folder given, the fixed part of a glob (`data/*/x.jsonl` -> relative to `data/`), or for a
single file its folder (so just its name). Rows count from 1 in every format: the line of a text
or JSONL file (blank lines counted), the data row of a CSV file (the header not counted), the
row of a Parquet file.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence

import numpy as np

from .arrow import pa

ID_COLUMN = "id"
EMBEDDING_COLUMN = "embedding"
RESERVED = (ID_COLUMN, EMBEDDING_COLUMN)
MANIFEST = "manifest.json"
FORMAT = "jina-jax-embeddings"  # the manifest's "format"; FORMAT_VERSION moves with the layout
FORMAT_VERSION = 1

# precision -> numpy dtype of the embedding column's values
EMBEDDING_DTYPES = {
    "float32": np.float32,
    "int8": np.int8,
    "uint8": np.uint8,
    "binary": np.int8,
    "ubinary": np.uint8,
}


def shard_name(index: int) -> str:
    """The file name of shard `index` of the plan: part-00000.parquet, ..."""
    return f"part-{index:05d}.parquet"


def default_id(input_name: str, row: int) -> str:
    """The id of a row when no --id-field is given: "<input name>:<row>" (row from 1)."""
    return f"{input_name}:{row}"


def embedding_width(dim: int, precision: str) -> int:
    """Values per row of the embedding column: D, or ceil(D / 8) bytes for packed bits."""
    if precision not in EMBEDDING_DTYPES:
        raise ValueError(f"precision must be one of {list(EMBEDDING_DTYPES)}, got {precision!r}")
    return -(-dim // 8) if precision.endswith("binary") else dim


def embedding_type(dim: int, precision: str) -> pa.DataType:
    """fixed_size_list<value>[W] of the embedding column for this output dimension."""
    value = pa.from_numpy_dtype(np.dtype(EMBEDDING_DTYPES[precision]))
    # the child is named "element", as Parquet's list layout names it: the type reads back equal
    return pa.list_(pa.field("element", value), embedding_width(dim, precision))


def embedding_column(array: np.ndarray) -> pa.FixedSizeListArray:
    """[N, W] numpy (float32, int8 or uint8) -> fixed_size_list<...>[W], sharing the buffer
    (no Python lists, no copy for a C-contiguous array)."""
    array = np.ascontiguousarray(array)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be [N, W], got shape {list(array.shape)}")
    child = pa.field("element", pa.from_numpy_dtype(array.dtype))
    return pa.FixedSizeListArray.from_arrays(
        pa.array(array.reshape(-1)), type=pa.list_(child, array.shape[1])
    )


def embedding_matrix(column) -> np.ndarray:
    """fixed_size_list column (Array or ChunkedArray) -> numpy [N, W]; no copy for one chunk
    without nulls (what every shard holds)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    width = column.type.list_size
    values = column.values.slice(column.offset * width, len(column) * width)
    return values.to_numpy(zero_copy_only=False).reshape(len(column), width)


def as_text(value) -> str | None:
    """A value for a string column: strings as they are, None as null, anything else as its JSON
    text (what a kept field of a text, JSONL or CSV input becomes)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def check_columns(keep_fields: Sequence[str]) -> None:
    """Kept fields may not repeat or take the names of the id and embedding columns."""
    seen = set()
    for name in keep_fields:
        if not name:
            raise ValueError("--keep-fields: an empty field name")
        if name in RESERVED:
            raise ValueError(
                f"--keep-fields {name!r}: the output has its own {name!r} column "
                "(keep the field under another name or use --id-field)"
            )
        if name in seen:
            raise ValueError(f"--keep-fields names {name!r} twice")
        seen.add(name)


def column_type(parquet_types: Sequence | None) -> pa.DataType:
    """The output type of an id or kept column: the Parquet inputs' shared type, given as the
    list of every input's type of it (None: some input is not Parquet), else string."""
    if parquet_types and all(t == parquet_types[0] for t in parquet_types):
        return parquet_types[0]
    return pa.string()


def output_schema(
    dim: int,
    precision: str,
    id_type: pa.DataType = pa.string(),  # noqa: B008
    kept: Sequence[tuple[str, pa.DataType]] = (),
) -> pa.Schema:
    """The schema of every shard: id, the kept fields, embedding (see the module docstring)."""
    fields = [pa.field(ID_COLUMN, id_type)] + [pa.field(n, t) for n, t in kept]
    fields.append(pa.field(EMBEDDING_COLUMN, embedding_type(dim, precision), nullable=False))
    return pa.schema(fields)


def describe(schema: pa.Schema) -> list[dict]:
    """[{"name", "type"}] of a schema, as the manifest records it."""
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def schema_record(schema: pa.Schema) -> str:
    """The schema as Arrow's own serialisation (base64), which the manifest keeps beside
    `describe`'s readable one: a corpus of no rows has no shard to read its types from."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def schema_from_record(record: str) -> pa.Schema:
    """`schema_record`'s inverse."""
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(record)))
