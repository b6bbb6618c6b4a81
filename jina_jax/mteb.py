"""An MTEB encoder for jina-jax models (`pip install jina-jax[mteb]`).

    import mteb
    from jina_jax import JinaEmbeddingsV3
    from jina_jax.mteb import MTEBEncoder

    encoder = MTEBEncoder(JinaEmbeddingsV3.from_pretrained("jinaai/jina-embeddings-v3"))
    results = mteb.evaluate(encoder, mteb.get_tasks(tasks=["STS12", "SciFact"]))

Each MTEB task type goes to the adapter MTEB's own jina-embeddings-v3 wrapper uses: retrieval
queries -> retrieval.query, documents -> retrieval.passage; clustering and reranking ->
separation; classification (also pair and multilabel) -> classification; STS, bitext mining,
summarisation -> text-matching. The adapter's instruction comes with it, as in `encode`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta

# MTEB prompt names (task type, or task type + "-query"/"-document") -> adapters.
TASK_ADAPTERS = {
    "Retrieval-query": "retrieval.query",
    "Retrieval-document": "retrieval.passage",
    "Clustering": "separation",
    "Reranking": "separation",
    "Classification": "classification",
    "PairClassification": "classification",
    "MultilabelClassification": "classification",
    "STS": "text-matching",
    "BitextMining": "text-matching",
    "Summarization": "text-matching",
}


# The ModelMeta fields this wrapper does not know (mteb requires them, as None).
UNKNOWN_META = (
    "loader",
    "release_date",
    "languages",
    "n_parameters",
    "memory_usage_mb",
    "license",
    "public_training_code",
    "public_training_data",
    "training_datasets",
)


class MTEBEncoder(AbsEncoder):
    """MTEB's encoder protocol over a `JinaEmbeddingsV3`: `encode(inputs, *, task_metadata,
    hf_split, hf_subset, prompt_type=None)` embeds every text of the data loader with the adapter
    of the task's type (None when MTEB's prompt lookup finds none: no adapter, no instruction).
    Extra keyword arguments (batch_size, truncate_dim, max_length, ...) go to `encode`."""

    def __init__(
        self,
        model,
        *,
        name: str = "jinaai/jina-embeddings-v3",
        revision: str | None = None,
        task_adapters: dict | None = None,
        **encode_kwargs: Any,
    ):
        self.model = model
        self.model_prompts = dict(TASK_ADAPTERS if task_adapters is None else task_adapters)
        for adapter in self.model_prompts.values():
            model.resolve_task(adapter)  # a checkpoint without the adapter fails here
        self.encode_kwargs = {"show_progress_bar": False, **encode_kwargs}
        dim = encode_kwargs.get("truncate_dim") or model.config.hidden_size
        self.mteb_model_meta = ModelMeta(
            name=name,
            revision=revision,
            max_tokens=model.config.max_position_embeddings - 2,
            embed_dim=dim,
            open_weights=True,
            framework=["JAX"],
            # pydantic makes the ScoringFunction of the string (checkers see a plain str here)
            similarity_fn_name="cosine",  # pyright: ignore[reportArgumentType]
            use_instructions=True,
            **dict.fromkeys(UNKNOWN_META),
        )

    def adapter_for(self, task_metadata, prompt_type=None) -> str | None:
        """The adapter for a task (and query/document side), by MTEB's own prompt lookup."""
        prompt_name = self.get_prompt_name(task_metadata, prompt_type)
        assert self.model_prompts is not None  # set in __init__ (AbsEncoder declares it Optional)
        return None if prompt_name is None else self.model_prompts[prompt_name]

    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type=None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        task = self.adapter_for(task_metadata, prompt_type)
        return self.model.encode(texts, task=task, **{**self.encode_kwargs, **kwargs})
