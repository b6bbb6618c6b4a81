"""`JinaEmbeddingsV3`: config + parameters + adapters + the compiled forward, in one object.

The object is thin: the computation is `JinaEncoder.apply`, a pure function of
(params, ids, padding, lora) that JAX users can call directly (`module`, `params_for`).
"""

from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import lora as lora_lib
from .attention import choose_implementation
from .config import JinaConfig, canonical_task
from .model import EncoderOutput, JinaEncoder, mean_pool

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
        self._tokenizer = None
        self._no_task = None
        self.mesh = None  # set by shard(): data parallelism over a 1-D device mesh
        self.shard_params = False  # shard(shard_params=True): weights split over the mesh too
        self.compile_count = 0  # forward compilations so far (each new shape or input structure)

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, src, *, dtype="float32", param_dtype=None, revision=None,
                        **kwargs) -> "JinaEmbeddingsV3":
        """Loads a hub id or a folder in any supported format (detected from its files).

        dtype: compute dtype; param_dtype: storage dtype of the weights (default: dtype).
        """
        from convert.formats import load  # the converter knows formats; the model knows none
        from convert.tree import nest
        from .hub import resolve

        folder = resolve(src, revision=revision)
        pdt = as_dtype(param_dtype if param_dtype is not None else dtype)
        host_dtype = _np_bf16() if pdt == jnp.bfloat16 else np.dtype(pdt.name)
        ckpt = load(folder, dtype=host_dtype, place=lambda x: jnp.asarray(x, dtype=pdt))
        params = nest(ckpt.params)
        return cls(ckpt.config, params, ckpt.adapters, ckpt.scales, dtype=dtype,
                   param_dtype=pdt, heads=ckpt.heads, source=folder, **kwargs)

    def save_pretrained(self, folder: str, format: str = "jina_jax") -> None:
        """Writes the base weights, every task adapter and the head (if any).

        format: "jina_jax" (our own folder, what `jina-jax convert` writes; parameter dtype),
        "transformers" (Transformers' `jina_embeddings_v3` weights plus one PEFT LoRA folder
        per task, loadable with `PeftModel.from_pretrained`; fp32) or "original" (the release's
        single `model.safetensors` with all adapters stacked; fp32). The parent folder must
        exist.
        """
        from convert.export import save_original, save_transformers
        from convert.formats import Checkpoint, save_native
        from convert.tree import flatten

        formats = ("jina_jax", "transformers", "original")
        if format not in formats:
            raise ValueError(f"format {format!r} is not supported; use one of {formats}")
        parent = os.path.dirname(os.path.abspath(os.fspath(folder)))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{parent}: the parent folder of {os.fspath(folder)!r} does "
                                    "not exist")
        flat = {p: np.asarray(v) for p, v in flatten(self.params).items()}
        adapters = jax.device_get(self.adapters)
        heads = self._heads_to_save()
        if format == "transformers":
            save_transformers(folder, self.config, flat, adapters, self.scales, self.source,
                              heads=heads, head=self._head_signature())
        elif format == "original":
            save_original(folder, self.config, flat, adapters, self.scales, self.source,
                          heads=heads)
        else:
            save_native(folder, Checkpoint(self.config, flat, adapters, self.scales, heads,
                                           "jina_jax", self.source or folder))

    def _heads_to_save(self) -> dict:
        """Head tensors under checkpoint names (head models put their current head here)."""
        return dict(self.heads)

    def _head_signature(self):
        return None

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
            if self._no_task is None:
                self._no_task = (self.params, self._word_factors(None))
            return self._no_task
        name = self.resolve_task(task)
        if name in self._merged:
            self._merged.move_to_end(name)
            return self._merged[name]
        merged, forward_lora = lora_lib.merge(self.params, self.adapters[name], self.scales[name])
        entry = (merged, self._word_factors(forward_lora))
        self._merged[name] = entry
        while len(self._merged) > max(1, self.max_cached_tasks):
            self._merged.popitem(last=False)
        return entry

    def add_adapter(self, name: str, rank: int = 4, alpha: float | None = None,
                    modules=lora_lib.DEFAULT_MODULES, *, instruction: str = "", seed: int = 0):
        """A new task adapter whose delta starts at zero (PEFT's initialisation), ready to train.
        scale = alpha / rank (alpha defaults to rank); modules: short names from
        `lora.MODULES` (default: every Linear and Embedding, as the release adapts).
        `instruction` is prepended to texts for this task by `encode`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if any(canonical_task(n) == canonical_task(name) for n in self.adapters):
            raise ValueError(f"an adapter named {name!r} already exists: {list(self.adapters)}")
        adapter = lora_lib.init_adapter(self.params, rank, tuple(modules), seed=seed)
        alpha = float(rank if alpha is None else alpha)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        self.adapters[name] = adapter
        self.scales[name] = alpha / rank
        cfg = self.config
        self.config = cfg.replace(
            lora_adaptations=tuple(cfg.lora_adaptations) + (name,),
            task_instructions=tuple(cfg.task_instructions) + ((name, instruction),))
        self.invalidate()
        return self

    def invalidate(self):
        """Drops every cache derived from params/adapters (after they change)."""
        self._merged.clear()
        self._stacked, self._no_task = {}, None
        if self.mesh is not None:
            from .sharding import place_params
            self.params = place_params(self.params, self.mesh, self.shard_params)

    def _word_factors(self, forward_lora):
        """The single-task `lora` argument, in one shape for every task (and for no task):
        word-embedding factors zero-padded to the largest rank among the adapters, zeros where
        a task has none. Switching tasks then reuses the compiled forward instead of tracing
        a new one; the zero columns add nothing."""
        rank = max((_word_rank(a) for a in self.adapters.values()), default=0)
        if rank == 0:
            return None
        cfg = self.config
        word = (forward_lora or {}).get("embeddings", {}).get("word")
        a = jnp.zeros((1, cfg.vocab_size, rank), jnp.float32)
        b = jnp.zeros((1, rank, cfg.hidden_size), jnp.float32)
        if word is not None:
            r = word["a"].shape[-1]
            a = a.at[..., :r].set(word["a"])
            b = b.at[:, :r].set(word["b"])
        return {"embeddings": {"word": {"a": a, "b": b}}}

    def _stack_for(self, names: tuple[str, ...]):
        if names not in self._stacked:
            self._stacked = {names: lora_lib.stack([self.adapters[n] for n in names],
                                                   [self.scales[n] for n in names])}
        return self._stacked[names]

    def shard(self, devices=None, *, shard_params: bool = False) -> "JinaEmbeddingsV3":
        """Data parallelism over `devices` (default: every device of the default backend):
        batch rows split, parameters replicated, or with `shard_params` each large weight split
        over the same devices (less memory per device; XLA gathers it where it is used).
        Batches must then have a multiple of the device count rows; `encode` pads its batches
        to that. Returns self."""
        from .sharding import batch_mesh

        self.mesh = batch_mesh(devices)
        self.shard_params = shard_params
        self.invalidate()
        return self

    @property
    def row_multiple(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.devices.size)

    # --- forward ---------------------------------------------------------------------------

    def module(self, implementation: str = "xla", deterministic: bool = True) -> JinaEncoder:
        return JinaEncoder(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                           implementation=implementation, deterministic=deterministic)

    def _compiled(self, implementation: str, pooled: bool = False):
        """The jitted forward for one attention implementation; `pooled` returns mean-pooled
        fp32 [B, H] instead of the full outputs (what `encode` needs: no [B, L, H] to host)."""
        key = (implementation, pooled)
        if key not in self._forward:
            module = self.module(implementation)

            def forward(params, extra, ids, mask, lengths, lora, rows, gate):
                self.compile_count += 1  # runs once per trace, i.e. per compiled shape
                out = module.apply({"params": params}, ids, attention_mask=mask, lengths=lengths,
                                   lora=lora, rows=rows, gate=gate)
                if not pooled:
                    return self._outputs(out, params, extra, lora, rows, gate)
                return mean_pool(out.last_hidden_state, lengths)

            self._forward[key] = jax.jit(forward)
        return self._forward[key]

    def _outputs(self, encoded: EncoderOutput, params, extra, lora, rows, gate, rng=None):
        """What the compiled forward returns (traced). Head models add their head here;
        `extra` carries their head parameters."""
        return encoded

    def _run(self, input_ids, attention_mask, task, extra=None, pooled=False, lengths=None):
        """`lengths` (int32[B], right-padded rows) may replace `attention_mask`."""
        ids = _check_ids(input_ids, self.config)
        if lengths is None:
            mask, lengths = _padding(attention_mask, ids.shape)
        else:
            mask = None
        params, lora, rows, gate = self._task_inputs(task, ids.shape[0])
        impl = choose_implementation(self.dtype, self.config.head_dim, lengths is not None,
                                     ids.shape[1])
        if impl == "cudnn" and self._cudnn_failed:
            impl = "xla"
        if self.mesh is not None:
            from .sharding import place_params, replicate, shard_rows

            params = place_params(params, self.mesh, self.shard_params)
            extra, lora = replicate((extra, lora), self.mesh)
            ids, mask, lengths, rows, gate = (shard_rows(x, self.mesh)
                                              for x in (ids, mask, lengths, rows, gate))
        args = (params, extra, ids, mask, lengths, lora, rows, gate)
        if impl == "cudnn":
            try:
                return self._compiled(impl, pooled)(*args)
            except Exception as e:  # noqa: BLE001 - any lowering failure falls back to XLA
                self._cudnn_failed = True
                impl = "xla"
                warnings.warn(f"cuDNN attention failed ({type(e).__name__}: {e}); "
                              "using the XLA implementation from now on")
        return self._compiled(impl, pooled)(*args)

    def pooled(self, input_ids, lengths, task=None):
        """Mean-pooled fp32 [B, H] for right-padded rows of the given lengths."""
        lengths = np.asarray(lengths, np.int32)
        if lengths.shape != (np.shape(input_ids)[0],):
            raise ValueError(f"lengths has shape {list(lengths.shape)}, expected "
                             f"[{np.shape(input_ids)[0]}]")
        return self._run(input_ids, None, task, pooled=True, lengths=lengths)

    @property
    def tokenizer(self):
        """The checkpoint's `tokenizer.json` through `tokenizers` (loaded on first use)."""
        if self._tokenizer is None:
            from .encode import load_tokenizer
            self._tokenizer = load_tokenizer(self.source)
        return self._tokenizer

    def encode(self, texts, task=None, *, prompt=None, batch_size: int = 32,
               max_length: int | None = None, truncate_dim: int | None = None,
               normalize: bool = True, show_progress_bar: bool | None = None,
               max_tokens_per_batch: int = 16384):
        """Sentence embeddings, as the release's `encode` computes them.

        texts: a string (returns [D]) or a list of strings (returns [N, D]), float32 numpy.
        task: a task name (its instruction is prepended and its adapter used), None (no adapter,
          no instruction), or a list with one task per text. prompt: replaces the instruction.
        max_length: tokens per text, `<s>`/`</s>` included (default 8192, at most the model's
          limit); longer texts are truncated. truncate_dim: Matryoshka dimension, applied before
          normalisation. Batches hold at most `batch_size` rows and `max_tokens_per_batch`
          padded tokens. The progress bar (stderr) is on by default for long jobs only.
        """
        from .encode import encode

        return encode(self, texts, task=task, prompt=prompt, batch_size=batch_size,
                      max_length=max_length, truncate_dim=truncate_dim, normalize=normalize,
                      show_progress_bar=show_progress_bar,
                      max_tokens_per_batch=max_tokens_per_batch)

    def __call__(self, input_ids, attention_mask=None, task=None) -> EncoderOutput:
        """input_ids, attention_mask: int [B, L] (numpy or jax). task: None (no adapter), a task
        name, or a list with one name (or None) per row."""
        return self._run(input_ids, attention_mask, task)

    def resolve_tasks(self, task, n: int, unit: str = "rows") -> list:
        """One adapter name (or None) per row, from None, one task, or a list of them."""
        if task is None or isinstance(task, str):
            return [None if task is None else self.resolve_task(task)] * n
        if not isinstance(task, Sequence):
            raise TypeError(f"task must be None, a string or a list of them, got "
                            f"{type(task).__name__}")
        if len(task) != n:
            raise ValueError(f"task has {len(task)} entries but there are {n} {unit}")
        names = []
        for i, t in enumerate(task):
            try:
                names.append(None if t is None else self.resolve_task(t))
            except (ValueError, TypeError) as e:
                raise type(e)(f"task[{i}]: {e}") from None
        return names

    def _task_inputs(self, task, batch: int):
        """(params, lora, rows, gate) for a task spec."""
        row_names = self.resolve_tasks(task, batch)
        if len(set(row_names)) == 1:  # one task (or none) for every row: the merged path
            params, lora = self.params_for(row_names[0])
            return params, lora, None, None
        distinct = sorted({n for n in row_names if n is not None})
        index = {n: i for i, n in enumerate(distinct)}
        rows = np.array([index.get(n, 0) for n in row_names], np.int32)
        gate = np.array([n is not None for n in row_names], np.float32)
        return self.params, self._stack_for(tuple(distinct)), rows, gate


def _word_rank(adapter) -> int:
    word = adapter.get("embeddings", {}).get("word")
    return 0 if word is None else int(np.shape(word["a"])[-1])


def _np_bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


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
