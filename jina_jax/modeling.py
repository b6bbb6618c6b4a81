"""`JinaEmbeddingsV3`: config + parameters + adapters + the compiled forward, in one object.

The object is thin: the computation is `JinaEncoder.apply`, a pure function of
(params, ids, padding, lora) that JAX users can call directly (`module`, `params_for`).
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import lora as lora_lib
from .attention import choose_implementation
from .config import JinaConfig, canonical_task
from .model import EncoderOutput, JinaEncoder

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


class JinaEmbeddingsV3:
    """jina-embeddings-v3 encoder with its task adapters.

    model = JinaEmbeddingsV3.from_pretrained(src, dtype="float32")
    out = model(input_ids, attention_mask, task="retrieval.query")
    out.last_hidden_state  # [B, L, H];  out.pooler_output  # [B, H] or None
    """

    def __init__(self, config: JinaConfig, params, adapters=None, scales=None, *,
                 dtype="float32", param_dtype=None, heads=None, max_cached_tasks: int = 2,
                 source: str | None = None):
        self.config = config
        self.dtype = as_dtype(dtype)
        self.param_dtype = as_dtype(param_dtype) if param_dtype is not None else self.dtype
        self.params = params
        self.adapters = dict(adapters or {})
        self.scales = dict(scales or {})
        self.heads = dict(heads or {})
        self.source = source
        self.max_cached_tasks = max_cached_tasks
        self._merged: collections.OrderedDict = collections.OrderedDict()
        self._stacked: dict = {}
        self._forward: dict = {}
        self._cudnn_failed = False

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, src, *, dtype="float32", param_dtype=None, revision=None,
                        **kwargs) -> "JinaEmbeddingsV3":
        """Loads a hub id or a folder in any supported format (detected from its files).

        dtype: compute dtype; param_dtype: storage dtype of the weights (default: dtype).
        """
        from convert.formats import load  # the converter knows formats; the model knows none
        from .hub import resolve

        folder = resolve(src, revision=revision)
        pdt = as_dtype(param_dtype if param_dtype is not None else dtype)
        host_dtype = _np_bf16() if pdt == jnp.bfloat16 else np.dtype(pdt.name)
        ckpt = load(folder, dtype=host_dtype, place=lambda x: jnp.asarray(x, dtype=pdt))
        params = _nest(ckpt.params)
        return cls(ckpt.config, params, ckpt.adapters, ckpt.scales, dtype=dtype,
                   param_dtype=pdt, heads=ckpt.heads, source=folder, **kwargs)

    # --- tasks -----------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    def resolve_task(self, task: str) -> str:
        """The adapter name for any spelling of a task; ValueError listing the valid ones."""
        if not isinstance(task, str):
            raise TypeError(f"task must be a string or None, got {type(task).__name__}")
        for name in self.adapters:
            if canonical_task(name) == canonical_task(task):
                return name
        raise ValueError(f"unknown task {task!r}; this checkpoint has {list(self.adapters)} "
                         "(or None for no adapter)")

    def params_for(self, task: str | None):
        """(params, lora) for one task: merged weights plus the word-embedding factors.

        The result is cached (least recently used, `max_cached_tasks` entries), so a single-task
        forward costs what the base model costs.
        """
        if task is None:
            return self.params, None
        name = self.resolve_task(task)
        if name in self._merged:
            self._merged.move_to_end(name)
            return self._merged[name]
        merged, forward_lora = lora_lib.merge(self.params, self.adapters[name], self.scales[name])
        entry = (merged, forward_lora or None)
        self._merged[name] = entry
        while len(self._merged) > max(1, self.max_cached_tasks):
            self._merged.popitem(last=False)
        return entry

    def _stack_for(self, names: tuple[str, ...]):
        if names not in self._stacked:
            self._stacked = {names: lora_lib.stack([self.adapters[n] for n in names],
                                                   [self.scales[n] for n in names])}
        return self._stacked[names]

    # --- forward ---------------------------------------------------------------------------

    def module(self, implementation: str = "xla", deterministic: bool = True) -> JinaEncoder:
        return JinaEncoder(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                           implementation=implementation, deterministic=deterministic)

    def _compiled(self, implementation: str):
        if implementation not in self._forward:
            module = self.module(implementation)

            def forward(params, extra, ids, mask, lengths, lora, rows, gate):
                out = module.apply({"params": params}, ids, attention_mask=mask, lengths=lengths,
                                   lora=lora, rows=rows, gate=gate)
                return self._outputs(out, params, extra, lora, rows, gate)

            self._forward[implementation] = jax.jit(forward)
        return self._forward[implementation]

    def _outputs(self, encoded: EncoderOutput, params, extra, lora, rows, gate):
        """What the compiled forward returns (traced). Head models add their head here;
        `extra` carries their head parameters."""
        return encoded

    def _run(self, input_ids, attention_mask, task, extra=None):
        ids = _check_ids(input_ids, self.config)
        mask, lengths = _padding(attention_mask, ids.shape)
        params, lora, rows, gate = self._task_inputs(task, ids.shape[0])
        impl = choose_implementation(self.dtype, self.config.head_dim, lengths is not None)
        if impl == "cudnn" and self._cudnn_failed:
            impl = "xla"
        args = (params, extra, ids, mask, lengths, lora, rows, gate)
        if impl == "cudnn":
            try:
                return self._compiled(impl)(*args)
            except Exception as e:  # noqa: BLE001 - any lowering failure falls back to XLA
                self._cudnn_failed = True
                warnings.warn(f"cuDNN attention failed ({type(e).__name__}: {e}); "
                              "using the XLA implementation from now on")
        return self._compiled("xla")(*args)

    def __call__(self, input_ids, attention_mask=None, task=None) -> EncoderOutput:
        """input_ids, attention_mask: int [B, L] (numpy or jax). task: None (no adapter), a task
        name, or a list with one name (or None) per row."""
        return self._run(input_ids, attention_mask, task)

    def _task_inputs(self, task, batch: int):
        """(params, lora, rows, gate) for a task spec."""
        if task is None or isinstance(task, str):
            params, lora = self.params_for(task)
            return params, lora, None, None
        if not isinstance(task, Sequence):
            raise TypeError(f"task must be None, a string or a list of them, got "
                            f"{type(task).__name__}")
        if len(task) != batch:
            raise ValueError(f"task has {len(task)} entries but the batch has {batch} rows")
        row_names = []
        for i, t in enumerate(task):
            try:
                row_names.append(None if t is None else self.resolve_task(t))
            except (ValueError, TypeError) as e:
                raise type(e)(f"task[{i}]: {e}") from None
        distinct = sorted({n for n in row_names if n is not None})
        if len(set(row_names)) == 1:  # one task (or none) for every row: the merged path
            params, lora = self.params_for(row_names[0])
            return params, lora, None, None
        if not distinct:
            return self.params, None, None, None
        index = {n: i for i, n in enumerate(distinct)}
        rows = np.array([index.get(n, 0) for n in row_names], np.int32)
        gate = np.array([n is not None for n in row_names], np.float32)
        return self.params, self._stack_for(tuple(distinct)), rows, gate


def _np_bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _check_ids(input_ids, cfg: JinaConfig) -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integers, got {ids.dtype}")
    if ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    bad = np.argwhere((ids < 0) | (ids >= cfg.vocab_size))
    if len(bad):
        r, c = bad[0]
        raise ValueError(f"input_ids[{r}, {c}] = {ids[r, c]} is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    return ids.astype(np.int32)


def _padding(attention_mask, shape):
    """(mask, lengths): lengths int32[B] when every row is right-padded, else the bool mask."""
    if attention_mask is None:
        return None, None
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise ValueError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(shape)}")
    mask = mask.astype(bool)
    lengths = mask.sum(axis=1).astype(np.int32)
    if (mask == (np.arange(shape[1])[None, :] < lengths[:, None])).all():
        return None, lengths
    return mask, None
