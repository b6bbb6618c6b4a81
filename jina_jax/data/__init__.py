"""Embedding whole corpora: text, JSONL, CSV and Parquet inputs in; Parquet shards with ids, kept
fields and an embedding column out, plus a manifest that makes the job resumable and exactly
once. Needs the `[data]` extra (pyarrow).

    schema.py    the output layout: columns, types, names, the id rule
    sources.py   the input files: expansion of paths/folders/globs, row counts, readers
    manifest.py  the shard plan's record: settings, inputs, finished shards; merging, checking
    job.py       the job: plan, resume, write shards atomically, progress
    reader.py    `open_dataset`: an output folder back as ids and an [N, D] array
    worker.py    what an engine's worker does with a batch (`BatchEncoder`), engine-free
    ray_data.py  Ray Data: `RayEmbedder`, `embed_dataset`, `embed_corpus_ray` ([ray] extra)
    beam.py      Apache Beam: `JinaModelHandler`, `WriteEmbeddings` ([beam] extra)
"""
