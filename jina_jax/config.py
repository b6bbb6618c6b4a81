"""The model configuration: one frozen dataclass for both checkpoint formats.

Field names mirror the Hugging Face `JinaEmbeddingsV3Config`; the task fields mirror the original
release's config (`lora_adaptations`, `task_instructions`, ...). Fields a format lacks take the
release's values, so nothing downstream needs to know which format the weights came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

# The released model's task adapters, in adapter order, and their instructions.
RELEASE_TASKS = (
    "retrieval.query",
    "retrieval.passage",
    "separation",
    "classification",
    "text-matching",
)
RELEASE_INSTRUCTIONS = (
    ("retrieval.query", "Represent the query for retrieving evidence documents: "),
    ("retrieval.passage", "Represent the document for retrieval: "),
    ("separation", ""),
    ("classification", ""),
    ("text-matching", ""),
)
RELEASE_MATRYOSHKA = (32, 64, 128, 256, 512, 768, 1024)

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")


def canonical_task(name: str) -> str:
    """The spelling used as a key everywhere: PEFT folder names use `_`, the release `.` and `-`."""
    return name.replace(".", "_").replace("-", "_")


@dataclasses.dataclass(frozen=True)
class JinaConfig:
    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 8194
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    rope_theta: float = 20000.0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    # Not a Hugging Face field: whether the checkpoint carries `pooler.dense`.
    add_pooling_layer: bool = True
    # Task metadata (the original release's config fields).
    lora_adaptations: tuple[str, ...] = RELEASE_TASKS
    task_instructions: tuple[tuple[str, str], ...] = RELEASE_INSTRUCTIONS
    lora_rank: int = 4
    lora_alpha: float = 1.0
    matryoshka_dimensions: tuple[int, ...] = RELEASE_MATRYOSHKA
    truncate_dim: int | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "lora_rank",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("layer_norm_eps", "rope_theta", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be a token id in [0, vocab_size), got {value!r}")
        if not all(isinstance(t, str) for t in self.lora_adaptations):
            raise ValueError(f"lora_adaptations must be task names, got {self.lora_adaptations!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; expected one of {_ACTIVATIONS}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def instruction(self, task: str) -> str:
        key = canonical_task(task)
        for name, text in self.task_instructions:
            if canonical_task(name) == key:
                return text
        return ""

    def replace(self, **changes) -> JinaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lora_adaptations"] = list(self.lora_adaptations)
        out["task_instructions"] = dict(self.task_instructions)
        out["matryoshka_dimensions"] = list(self.matryoshka_dimensions)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JinaConfig:
        """Builds a config from any of the three `config.json` spellings; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "rotary_emb_base" in d:  # the original release's name
            kw["rope_theta"] = d["rotary_emb_base"]
        rope = d.get("rope_parameters") or {}
        if isinstance(rope, dict) and "rope_theta" in rope:
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(
                    f"rope_parameters.rope_type {rope_type!r} is not supported "
                    "(jina-embeddings-v3 uses plain rotary embeddings)"
                )
            kw["rope_theta"] = rope["rope_theta"]
        for key in ("lora_adaptations", "matryoshka_dimensions"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        if isinstance(kw.get("task_instructions"), dict):
            kw["task_instructions"] = tuple(kw["task_instructions"].items())
        elif kw.get("task_instructions") is not None:
            kw["task_instructions"] = tuple(tuple(p) for p in kw["task_instructions"])
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if key in kw and kw[key] is None:
                del kw[key]
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> JinaConfig:
        with open(path) as f:
            try:
                raw = json.load(f)
            except RecursionError:  # json's own error for a document nested past the limit
                raise ValueError(f"{path}: JSON nested too deeply") from None
        return cls.from_dict(raw)


# Dtype spellings accepted wherever a dtype is named (API, CLI, converter).
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def as_dtype(dtype) -> np.dtype:
    """A numpy dtype from a name ("bfloat16", "fp32", ...) or a dtype object; bfloat16 is
    `ml_dtypes.bfloat16`, which is also what `jnp.bfloat16` is."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPE_NAMES)}")
        dtype = DTYPE_NAMES[dtype]
        return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    return np.dtype(dtype)
