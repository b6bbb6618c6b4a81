"""The encoder as a Flax NNX module, for users who compose models in NNX.

    encoder = JinaEncoderNNX.from_pretrained(src)          # or model.to_nnx()
    out = encoder(ids, lengths=lengths, task="retrieval.query")   # EncoderOutput
    emb = encoder.embed(ids, lengths, task="retrieval.passage")   # [B, H] mean-pooled

One source of truth for the math: the module holds the weights as NNX variables and runs the
Linen `JinaEncoder` (`encoder.py`) as a pure function of their values, so the NNX and Linen forms
cannot drift apart. Base weights are `nnx.Param`s, every task adapter's factors `nnx.LoRAParam`s:

    nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)   # trains the adapters only
    nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)       # everything (LoRAParam is one)

A task runs the unmerged low-rank path (`lora.py`), which is differentiable in the factors and
lets one batch mix tasks (`task=[...]`, one per row); `task=None` runs the base weights only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import jax
import jax.numpy as jnp
import numpy.typing as npt
from flax import nnx

from . import checkpoint
from . import lora as lora_lib
from .attention import choose_implementation
from .config import JinaConfig, as_dtype, canonical_task
from .encoder import EncoderOutput, JinaEncoder, mean_pool


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _values(tree):
    """The arrays of a tree of NNX variables."""
    return jax.tree_util.tree_map(lambda v: v[...], tree, is_leaf=_is_variable)


class JinaEncoderNNX(nnx.Module):
    """jina-embeddings-v3's encoder with its task adapters, as an `nnx.Module`.

    config: the architecture; params: the Linen parameter tree (`model.params`); adapters:
    {task: factor tree} (`model.adapters`) and scales {task: float}; dtype: compute dtype,
    param_dtype: storage dtype of the base weights (factors stay as given, normally fp32);
    remat: per-layer rematerialisation in training (see `JinaEncoder`).
    """

    def __init__(
        self,
        config: JinaConfig,
        params: Mapping,
        adapters: Mapping | None = None,
        scales: Mapping | None = None,
        *,
        dtype: npt.DTypeLike = "float32",
        param_dtype=None,
        remat: str | None = None,
    ):
        self.config = config
        self.dtype = as_dtype(dtype)
        self.param_dtype = as_dtype(param_dtype) if param_dtype is not None else self.dtype
        self.remat = remat
        cast = lambda x: nnx.Param(jnp.asarray(x, self.param_dtype))
        self.params = nnx.data(jax.tree_util.tree_map(cast, dict(params)))
        adapters = dict(adapters or {})
        self.adapters = nnx.data(
            {
                name: jax.tree_util.tree_map(lambda x: nnx.LoRAParam(jnp.asarray(x)), dict(tree))
                for name, tree in adapters.items()
            }
        )
        scales = dict(scales or {})
        missing = set(adapters).difference(scales)
        if missing:
            raise ValueError(f"adapters {sorted(missing)} have no scale")
        # Static: a Python tuple, part of the module's structure rather than its state.
        self.scales = tuple((name, float(scales[name])) for name in adapters)

    @classmethod
    def from_pretrained(
        cls, src, *, dtype="float32", param_dtype=None, revision=None, remat: str | None = None
    ) -> JinaEncoderNNX:
        """Loads a hub id or a folder in any supported format, as `JinaEmbeddingsV3` does."""
        param_dtype = param_dtype if param_dtype is not None else dtype
        ckpt = checkpoint.load(src, dtype=param_dtype, revision=revision)
        return cls(*checkpoint.weights(ckpt), dtype=dtype, param_dtype=param_dtype, remat=remat)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.scales)

    def resolve_tasks(self, task, rows: int) -> list:
        """One adapter name (or None) per row, from None, one task (any spelling) or a list."""

        def one(t, where: str):
            if t is None:
                return None
            for name in self.tasks:
                if isinstance(t, str) and canonical_task(name) == canonical_task(t):
                    return name
            raise ValueError(
                f"{where}unknown task {t!r}; this encoder has {list(self.tasks)} "
                "(or None for no adapter)"
            )

        if task is None or isinstance(task, str):
            return [one(task, "")] * rows
        if not isinstance(task, Sequence) or len(task) != rows:
            raise ValueError(
                f"task must be None, a task name or a list of {rows} of them (one "
                f"per row), got {task!r}"
            )
        return [one(t, f"task[{i}]: ") for i, t in enumerate(task)]

    def lora_inputs(self, task, rows: int) -> dict:
        """The Linen forward's adapter arguments for a task spec: the stacked factors of the
        tasks present (scales folded in) and each row's task_index / task_mask."""
        row_tasks = self.resolve_tasks(task, rows)
        names, task_index, task_mask = lora_lib.task_rows(row_tasks)
        if not names:
            return {"lora": None, "task_index": None, "task_mask": None}
        scales = dict(self.scales)
        lora = lora_lib.stack(
            [_values(self.adapters[n]) for n in names], [scales[n] for n in names]
        )
        return {
            "lora": lora,
            "task_index": jnp.asarray(task_index),
            "task_mask": jnp.asarray(task_mask),
        }

    def __call__(
        self,
        input_ids,
        *,
        lengths=None,
        attention_mask=None,
        task=None,
        rngs: nnx.Rngs | None = None,
    ) -> EncoderOutput:
        """input_ids: int[B, L]; padding as `lengths` int32[B] (right-padded rows) or
        `attention_mask` [B, L] (any pattern); task: None, a name, or one per row (static).
        rngs: an `nnx.Rngs` with a "dropout" stream turns the config's dropout on (training)."""
        b, length = input_ids.shape
        right_padded = attention_mask is None
        implementation = choose_implementation(
            self.dtype, self.config.head_dim, right_padded, length
        )
        module = JinaEncoder(
            self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            implementation=implementation,
            deterministic=rngs is None,
            remat=self.remat,
        )
        dropout = None if rngs is None else {"dropout": rngs.dropout()}
        return cast(  # apply without `mutable` returns __call__'s output, not a tuple
            EncoderOutput,
            module.apply(
                {"params": _values(self.params)},
                input_ids,
                attention_mask=attention_mask,
                lengths=lengths,
                rngs=dropout,
                **self.lora_inputs(task, b),
            ),
        )

    def embed(
        self, input_ids, lengths, task=None, *, normalize: bool = True, rngs: nnx.Rngs | None = None
    ):
        """Mean-pooled fp32 [B, H] over each row's `lengths` tokens (as `encode` pools),
        L2-normalised unless normalize=False."""
        out = self(input_ids, lengths=lengths, task=task, rngs=rngs)
        pooled = mean_pool(out.last_hidden_state, lengths)
        if not normalize:
            return pooled
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    def weights(self) -> dict:
        """{"params": base tree, "adapters": {task: factors}} as plain arrays (what
        `JinaEmbeddingsV3.update` takes, to encode or save what was trained here)."""
        return {
            "params": _values(self.params),
            "adapters": {name: _values(tree) for name, tree in self.adapters.items()},
        }
