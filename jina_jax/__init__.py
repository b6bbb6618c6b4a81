"""jina-jax: jina-embeddings-v3 in pure JAX/Flax.

The public names below load their module on first use, so `import jina_jax` (and the command
line's `--help`) costs no JAX import, and `convert` can use `jina_jax.config` without pulling in
the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "JinaConfig": "config",
    "JinaEncoder": "encoder",
    "EncoderOutput": "encoder",
    "JinaEmbeddingsV3": "embedder",
    "JinaEncoderNNX": "nnx",
    "JinaEmbeddingsV3ForMaskedLM": "heads",
    "JinaEmbeddingsV3ForSequenceClassification": "heads",
    "JinaEmbeddingsV3ForTokenClassification": "heads",
    "JinaEmbeddingsV3ForQuestionAnswering": "heads",
    "Trainer": "training",
    "TrainState": "training",
    "Contrastive": "training",
    "CoSENT": "training",
    "HeadLoss": "training",
    "Batcher": "batcher",
    "QueueFull": "batcher",
    # needs the [serve] extra (Starlette, uvicorn)
    "EmbeddingServer": "serve",
    # need the [data] extra (pyarrow)
    "open_dataset": "data.reader",
    "EmbeddingDataset": "data.reader",
    "CorpusJob": "data.job",
    "embed_corpus": "data.job",
    # need the [ray] extra (ray[data])
    "RayEmbedder": "data.ray_data",
    "embed_dataset": "data.ray_data",
    "embed_corpus_ray": "data.ray_data",
}
# `aot`: compiling for a GPU/TPU target without it (jina_jax.aot.compile_forward, plan, ...)
_SUBMODULES = ("aot", "losses", "training", "orbax_state")

# Computed from the lazy table; the TYPE_CHECKING block below names the same for checkers.
__all__ = sorted(_EXPORTS) + list(_SUBMODULES)  # pyright: ignore[reportUnsupportedDunderAll]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import aot, losses, orbax_state, training
    from .batcher import Batcher, QueueFull
    from .config import JinaConfig
    from .data.job import CorpusJob, embed_corpus
    from .data.ray_data import RayEmbedder, embed_corpus_ray, embed_dataset
    from .data.reader import EmbeddingDataset, open_dataset
    from .embedder import JinaEmbeddingsV3
    from .encoder import EncoderOutput, JinaEncoder
    from .heads import (
        JinaEmbeddingsV3ForMaskedLM,
        JinaEmbeddingsV3ForQuestionAnswering,
        JinaEmbeddingsV3ForSequenceClassification,
        JinaEmbeddingsV3ForTokenClassification,
    )
    from .nnx import JinaEncoderNNX
    from .serve import EmbeddingServer
    from .training import Contrastive, CoSENT, HeadLoss, Trainer, TrainState
