"""What an engine's worker does with one batch of rows, whichever engine runs it (Ray Data's
`RayEmbedder`, Beam's `JinaModelHandler`): load the model once, check encode's options once,
and embed a batch of texts with errors that name the bad row.

No engine is imported here: each engine's module wraps a `BatchEncoder` in its own protocol.
"""

from __future__ import annotations

import os
from typing import Any, cast

import jax
import numpy as np

from ..embedder import JinaEmbeddingsV3
from ..encode import DEFAULT_TOKEN_BUDGET, DEFAULT_WINDOW, check_options
from .schema import EMBEDDING_DTYPES, embedding_width


def load_model(model: str, dtype: str, shard: bool | None) -> JinaEmbeddingsV3:
    """The model in this worker; data parallel over its devices when it sees several (a TPU
    host, several GPUs given to one worker) unless shard=False."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be a checkpoint path or hub id (loaded once per worker), "
            f"got {type(model).__name__}"
        )
    loaded = JinaEmbeddingsV3.from_pretrained(str(model), dtype=dtype)
    devices = jax.local_devices()
    if shard or (shard is None and len(devices) > 1):
        loaded.shard(devices)
    return loaded


def where(row: int, ids) -> str:
    """How an error names a row: its place in the batch and, when known, its id."""
    return f"row {row} of the batch" + ("" if ids is None else f" (id {ids[row]!r})")


class BatchEncoder:
    """A loaded model and encode's options, checked once; `encode(texts, tasks, ids)` embeds
    one batch.

    task: one adapter for every row (None: no adapter) unless each row names its own
    (`encode(..., tasks=[...])`). prompt, max_length, truncate_dim, normalize, precision,
    ranges, batch_size, max_tokens_per_batch: as `encode`. dtype: the compute dtype. shard: data
    parallel over the worker's devices (default: when it sees more than one).
    """

    def __init__(
        self,
        model: str,
        *,
        task: str | None = None,
        prompt: str | None = None,
        max_length: int | None = None,
        truncate_dim: int | None = None,
        normalize: bool = True,
        precision: str = "float32",
        ranges=None,
        dtype: str = "float32",
        batch_size: int = 32,
        max_tokens_per_batch: int = DEFAULT_TOKEN_BUDGET,
        shard: bool | None = None,
    ):
        self.model = load_model(model, dtype, shard)
        self.task = None if task is None else self.model.resolve_task(task)
        self.options: dict[str, Any] = dict(
            prompt=prompt,
            max_length=max_length,
            truncate_dim=truncate_dim,
            normalize=normalize,
            precision=precision,
            ranges=ranges,
            batch_size=batch_size,
            max_tokens_per_batch=max_tokens_per_batch,
        )
        # every option checked here, once per worker, not in the first batch
        _, self.dim = check_options(
            self.model,
            window=DEFAULT_WINDOW,
            streaming=True,
            **{k: v for k, v in self.options.items() if k not in ("prompt", "normalize")},
        )
        self.precision = precision

    def resolve_tasks(self, values, ids, what: str) -> list:
        """One adapter name (or None) per row from a column of task names; `what` names the
        column in errors."""
        resolved = {}
        for row, value in enumerate(values):
            if value not in resolved:
                try:
                    resolved[value] = None if value is None else self.model.resolve_task(value)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{what}, {where(row, ids)}: {e}") from None
        return [resolved[v] for v in values]

    def encode(self, texts: list, tasks: list | None = None, ids=None, what="text") -> np.ndarray:
        """[N, W] embeddings of `texts` (float32, or int8/uint8 for the quantised precisions)
        with `tasks` (one per row) or the encoder's task. A text that is not a string is an
        error naming its row (`what`: how the error names the text's field)."""
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(
                    f"{what}, {where(row, ids)}: "
                    f"{'null' if text is None else type(text).__name__}, not a string"
                )
        if not texts:
            width = embedding_width(self.dim, self.precision)
            return np.empty((0, width), EMBEDDING_DTYPES[self.precision])
        task = self.task if tasks is None else tasks
        # one array: the options hold no output_value (so sentence embeddings)
        return cast(
            np.ndarray,
            self.model.encode(texts, task=task, show_progress_bar=False, **self.options),
        )
