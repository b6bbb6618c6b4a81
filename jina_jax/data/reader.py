"""An embedded corpus folder read back: `open_dataset(folder)` checks the manifest (one header,
every shard of the plan done, each file's size, and with verify=True its sha256) and gives the
rows as Arrow (memory-mapped shard files) with the ids and the [N, D] embeddings.

    ds = open_dataset("out/")
    ds.ids              # pyarrow ChunkedArray of the ids, in input order
    ds.embeddings       # numpy [N, D] float32 (or the packed/quantised dtype of its precision)
    ds.table            # every column (id, kept fields, embedding) as one pyarrow Table
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from .arrow import pa, pq
from .manifest import Manifest, candidates, check_shard, difference, read_manifests
from .schema import (
    EMBEDDING_COLUMN,
    ID_COLUMN,
    MANIFEST,
    describe,
    embedding_matrix,
    schema_from_record,
)


@dataclasses.dataclass(frozen=True)
class EmbeddingDataset:
    """The rows of an embedded corpus folder, in input order."""

    folder: str
    manifest: Manifest  # the merged manifest (header and every shard's record)
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> pa.ChunkedArray:
        return self.table.column(ID_COLUMN)

    @functools.cached_property
    def embeddings(self) -> np.ndarray:
        """[N, W] numpy: float32 [N, D], or int8/uint8 (packed bits: W = ceil(D / 8))."""
        return embedding_matrix(self.table.column(EMBEDDING_COLUMN))

    @property
    def dim(self) -> int:
        return self.manifest.header["dim"]


def open_dataset(folder: str, *, verify: bool = False) -> EmbeddingDataset:
    """Opens a folder `jina-jax embed --output FOLDER/` wrote. Refuses (ValueError naming the
    folder or the file) a folder without a manifest, manifests of different jobs, a shard the
    manifest lacks (the job is not finished: rerun it), a file whose size (verify=True: sha256)
    differs from its record, or a shard whose rows or schema do not match."""
    manifests = read_manifests(folder)
    if not manifests:
        raise ValueError(f"{folder}: no {MANIFEST}: not a folder jina-jax embed wrote")
    header = manifests[0].header
    for m in manifests[1:]:
        diff = difference(header, m.header)
        if diff:
            raise ValueError(f"{folder}: its manifests are of different jobs ({diff})")
    records = candidates(manifests)
    chosen, missing = {}, []
    for shard in header["plan"]:
        record = check_shard(folder, records.get(shard["shard"], []), hash_file=verify)
        if record is None:
            missing.append(shard["file"])
        else:
            chosen[shard["shard"]] = record
    if missing:
        raise ValueError(
            f"{folder}: {len(missing)} of {len(header['plan'])} shard(s) are not "
            f"done or do not match the manifest (first: {missing[0]}); rerun the "
            "same embed command to finish"
        )
    tables = []
    for shard in header["plan"]:
        path = os.path.join(folder, shard["file"])
        table = pq.read_table(path, memory_map=True)
        if describe(table.schema) != header["schema"]:
            raise ValueError(
                f"{path}: its columns {describe(table.schema)} are not the "
                f"manifest's {header['schema']}"
            )
        if table.num_rows != chosen[shard["shard"]]["rows"]:
            raise ValueError(
                f"{path}: {table.num_rows} rows, the manifest says {chosen[shard['shard']]['rows']}"
            )
        tables.append(table)
    merged = Manifest(header, chosen, 0, 1, manifests[0].version)
    if tables:
        table = pa.concat_tables(tables)
    elif "arrow_schema" in header:  # a corpus of no rows: no shard, the manifest's columns
        table = schema_from_record(header["arrow_schema"]).empty_table()
    else:
        raise ValueError(
            f"{folder}: a corpus of no rows written before jina-jax recorded its Arrow schema; "
            "rerun the embed command with --overwrite"
        )
    return EmbeddingDataset(os.path.abspath(folder), merged, table)
