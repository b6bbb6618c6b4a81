"""`JinaEmbeddingsV3`: the user object. Weights (params, adapters, scales) and the config, plus
three helpers it owns: a per-task cache of adapter factors (`lora.TaskCache`), the compiled
forward (`forward.CompiledForward`) and the tokenizer. Loading and saving are `checkpoint.py`'s.

The computation itself is `JinaEncoder.apply`, a pure function of (params, ids, padding, lora)
that JAX users can call directly (`module`, `params_for`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from . import checkpoint
from . import lora as lora_lib
from .adapters import Adapter, AdapterSet, read_adapter
from .architecture import DEFAULT_LORA_MODULES
from .config import JinaConfig, as_dtype, canonical_task
from .encode import DEFAULT_WINDOW, encode, iter_encode
from .encoder import EncoderOutput, JinaEncoder
from .forward import CompiledForward
from .late_chunking import encode_late_chunks
from .nnx import JinaEncoderNNX
from .sharding import on_mesh
from .tokenize import load_tokenizer


class JinaEmbeddingsV3:
    """jina-embeddings-v3 encoder with its task adapters.

    model = JinaEmbeddingsV3.from_pretrained(src, dtype="float32")
    out = model(input_ids, attention_mask, task="retrieval.query")
    out.last_hidden_state  # [B, L, H];  out.pooler_output  # [B, H] or None
    """

    def __init__(
        self,
        config: JinaConfig,
        params,
        adapters=None,
        scales=None,
        *,
        dtype: npt.DTypeLike = "float32",
        param_dtype=None,
        heads=None,
        max_cached_tasks: int = 2,
        source: str | None = None,
        precision: str | None = None,
    ):
        self.config = config
        self.dtype = as_dtype(dtype)
        self.param_dtype = as_dtype(param_dtype) if param_dtype is not None else self.dtype
        self.params = params
        self.adapters = dict(adapters or {})
        self.scales = dict(scales or {})
        self.heads = dict(heads or {})  # head tensors of the checkpoint, under their own keys
        self.source = source
        self.head_params = None  # a head model's head parameters
        self.task_cache = lora_lib.TaskCache(max_cached_tasks)
        self.forward = CompiledForward(
            config, self.dtype, self.param_dtype, self.head_outputs, precision
        )
        self._tokenizer = None

    # --- loading and saving ----------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        src,
        *,
        dtype="float32",
        param_dtype=None,
        revision=None,
        adapters: dict | None = None,
        **kwargs,
    ) -> JinaEmbeddingsV3:
        """Loads a hub id or a folder in any supported format (detected from its files).

        adapters: {task name: PATH or PATH@TASK} of user adapters to add (see `adapters.py`:
        an adapter folder of `jina-jax finetune --adapter-only`, a PEFT LoRA folder, or a
        fine-tuned checkpoint).

        dtype: compute dtype; param_dtype: storage dtype of the weights (default: dtype).
        precision: matmul precision of the compiled forward (None: JAX's default, which is
        TF32 for fp32 on GPU; "highest": full fp32).
        """
        param_dtype = param_dtype if param_dtype is not None else dtype
        ckpt = checkpoint.load(src, dtype=param_dtype, revision=revision)
        model = cls(
            *checkpoint.weights(ckpt),
            dtype=dtype,
            param_dtype=param_dtype,
            heads=ckpt.heads,
            source=ckpt.folder,
            **kwargs,
        )
        model._tokenizer = ckpt.tokenizer  # read (and checked) before the weights
        for name, spec in (adapters or {}).items():
            model.attach_adapter(read_adapter(name, spec, model.config))
        return model

    def save_pretrained(self, folder: str, format: str = "jina_jax") -> None:
        """Writes the base weights, every task adapter and the head (if any).

        format: "jina_jax" (our own folder, what `jina-jax convert` writes; parameter dtype),
        "transformers" (Transformers' `jina_embeddings_v3` weights plus one PEFT LoRA folder
        per task, loadable with `PeftModel.from_pretrained`; fp32) or "original" (the release's
        single `model.safetensors` with all adapters stacked; fp32). The parent folder must
        exist.
        """
        ckpt = checkpoint.Checkpoint(
            self.config,
            self.params,
            self.adapters,
            self.scales,
            self.head_tensors(),
            "jina_jax",
            self.source,
        )
        checkpoint.save(folder, format, ckpt, head=self.head_signature())

    def head_tensors(self) -> dict:
        """Head tensors to save, under checkpoint keys (a head model puts its own head here)."""
        return dict(self.heads)

    def head_signature(self) -> tuple[str, int | None] | None:
        """(head kind, num_labels) of a head model; None for the embedding model."""
        return None

    def head_outputs(
        self, encoded: EncoderOutput, params, head_params, lora, task_index, task_mask
    ) -> Any:
        """What the compiled forward returns (traced): the encoder output here; a head model
        applies its head (so its own output type)."""
        return encoded

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
        raise ValueError(
            f"unknown task {task!r}; this checkpoint has {list(self.adapters)} "
            "(or None for no adapter)"
        )

    def resolve_tasks(self, task, n: int, unit: str = "rows") -> list:
        """One adapter name (or None) per row, from None, one task, or a list of them."""
        if task is None or isinstance(task, str):
            return [None if task is None else self.resolve_task(task)] * n
        if not isinstance(task, Sequence):
            raise TypeError(
                f"task must be None, a string or a list of them, got {type(task).__name__}"
            )
        if len(task) != n:
            raise ValueError(f"task has {len(task)} entries but there are {n} {unit}")
        names = []
        for i, t in enumerate(task):
            try:
                names.append(None if t is None else self.resolve_task(t))
            except (ValueError, TypeError) as e:
                raise type(e)(f"task[{i}]: {e}") from None
        return names

    def params_for(self, task: str | None, *, merge: bool = True):
        """(params, lora) for one task, the pure function's inputs (see `module`).

        merge=True: merged weights `W + s·B·A` plus the word-embedding factors, a new full copy
        of the adapted weights on every call (not cached: keep the result if you reuse it).
        merge=False: the base params (no copy) plus the task's factors, for the single-task
        low-rank forward that the model itself runs (cached, `max_cached_tasks` tasks).
        """
        name = None if task is None else self.resolve_task(task)
        if merge:
            cfg = self.config
            return lora_lib.merged_task(
                self.params, self.adapters, self.scales, name, cfg.vocab_size, cfg.hidden_size
            )
        return self.params, self.task_cache.single(name, self.adapters, self.scales)

    @property
    def cached_tasks(self) -> list:
        """Tasks whose single-task factors are cached (None: no task), least recently used first."""
        return list(self.task_cache.single_tasks)

    def task_inputs(
        self, task, batch: int, merge: bool = True, adapters: AdapterSet | None = None
    ) -> dict:
        """The forward's weight inputs for a task spec over `batch` rows: the base params plus,
        for one task (or none), that task's factors run for every row (`params_for(task,
        merge=False)`: no merged copy of the weights), else every adapter's factors stacked
        with per-row task_index/mask. merge=False takes the per-row path even for one task: one
        compiled structure for any mix of tasks (what a server batching requests together
        wants). `adapters`: the per-row path over that set's fixed layout instead (its task
        names)."""
        with on_mesh(self.layout):
            if adapters is not None:
                row_tasks = [task] * batch if task is None or isinstance(task, str) else list(task)
                task_index, task_mask = adapters.rows(row_tasks)
                return {
                    "params": self.params,
                    "lora": adapters.lora,
                    "task_index": task_index,
                    "task_mask": task_mask,
                }
            return self._task_inputs(self.resolve_tasks(task, batch), merge)

    def _task_inputs(self, row_tasks: list, merge: bool) -> dict:
        if (merge and len(set(row_tasks)) == 1) or not self.adapters:
            params, lora = self.params_for(row_tasks[0], merge=False)
            return {"params": params, "lora": lora}
        names, task_index, task_mask = lora_lib.task_rows(row_tasks, sorted(self.adapters))
        lora = self.task_cache.mixed(tuple(names), self.adapters, self.scales)
        return {
            "params": self.params,
            "lora": lora,
            "task_index": task_index,
            "task_mask": task_mask,
        }

    def add_adapter(
        self,
        name: str,
        rank: int = 4,
        alpha: float | None = None,
        modules=DEFAULT_LORA_MODULES,
        *,
        instruction: str = "",
        seed: int = 0,
    ):
        """A new task adapter whose delta starts at zero (PEFT's initialisation), ready to train.
        scale = alpha / rank (alpha defaults to rank); modules: short names from
        `architecture.LORA_MODULES` (default: every Linear and Embedding, as the release
        adapts). `instruction` is prepended to texts for this task by `encode`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if any(canonical_task(n) == canonical_task(name) for n in self.adapters):
            raise ValueError(f"an adapter named {name!r} already exists: {list(self.adapters)}")
        adapter = lora_lib.init_adapter(self.params, rank, tuple(modules), seed=seed)
        alpha = float(rank if alpha is None else alpha)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        return self.attach_adapter(Adapter(name, adapter, alpha / rank, instruction, "new"))

    def attach_adapter(self, adapter: Adapter):
        """Adds (or replaces) a task adapter read by `adapters.read_adapter`: its factors,
        scale and instruction. Returns self."""
        name = adapter.name
        for old in [n for n in self.adapters if canonical_task(n) == canonical_task(name)]:
            self.detach_adapter(old)
        self.adapters[name] = adapter.factors
        self.scales[name] = adapter.scale
        cfg = self.config
        self.config = cfg.replace(
            lora_adaptations=tuple(cfg.lora_adaptations) + (name,),
            task_instructions=tuple(cfg.task_instructions) + ((name, adapter.instruction),),
        )
        self.invalidate()
        return self

    def detach_adapter(self, name: str):
        """Removes a task adapter (any spelling of its name). Returns self."""
        name = self.resolve_task(name)
        del self.adapters[name]
        del self.scales[name]
        cfg = self.config
        self.config = cfg.replace(
            lora_adaptations=tuple(t for t in cfg.lora_adaptations if t != name),
            task_instructions=tuple(kv for kv in cfg.task_instructions if kv[0] != name),
        )
        self.invalidate()
        return self

    def update(self, trained: dict):
        """Takes trained weights: a tree with any of "params" (the base encoder), "adapters"
        ({task: factors}, replacing those tasks) and "head" (a head model's head), as
        `Trainer.trained(state)` returns it. Stored in the parameter dtype (factors in fp32);
        every cache derived from the old weights is dropped. Returns self."""
        cast = lambda tree, dtype: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)
        if "params" in trained:
            self.params = cast(trained["params"], self.param_dtype)
        for name, tree in trained.get("adapters", {}).items():
            self.adapters[self.resolve_task(name)] = cast(tree, np.float32)
        if "head" in trained:
            if self.head_params is None:
                raise ValueError(f"{type(self).__name__} has no head to update")
            self.head_params = cast(trained["head"], self.param_dtype)
        self.invalidate()
        return self

    def invalidate(self):
        """Drops every cache derived from params/adapters (after they change)."""
        self.task_cache.clear()
        self.params = self.forward.place(self.params)

    # --- devices ---------------------------------------------------------------------------

    def shard(
        self,
        devices=None,
        *,
        shard_params: bool = False,
        mesh=None,
        data_axis: str = "data",
        model_axis: str | None = None,
    ) -> JinaEmbeddingsV3:
        """Runs on a device mesh (see `sharding.py`): batch rows split over `data_axis`;
        weights replicated, or split tensor-parallel over `model_axis` (heads and MLP units),
        and with `shard_params` each large weight split over the data axis too (less memory
        per device; XLA gathers it where it is used). The mesh: `mesh`, else the one of
        `jax.set_mesh` in context, else a 1-D data mesh over `devices` (default: every device
        of the default backend). Batches must then have a multiple of the data axis's size
        rows; `encode` pads its batches to that. Returns self."""
        self.forward.shard(
            devices, shard_params, mesh=mesh, data_axis=data_axis, model_axis=model_axis
        )
        self.invalidate()
        return self

    @property
    def layout(self):
        """The mesh and what its axes do (`sharding.Layout`), None on one device."""
        return self.forward.layout

    @property
    def mesh(self):
        return self.forward.mesh

    @property
    def shard_params(self) -> bool:
        return self.forward.shard_params

    @property
    def row_multiple(self) -> int:
        return 1 if self.layout is None else self.layout.rows_multiple

    @property
    def compile_count(self) -> int:
        """Forward executables made ready so far, one per new shape or input structure:
        traced and compiled, or loaded from the executable store (`forward.loaded_count`)."""
        return self.forward.compile_count

    # --- forward ---------------------------------------------------------------------------

    def module(self, implementation: str = "xla", deterministic: bool = True) -> JinaEncoder:
        return self.forward.module(implementation, deterministic)

    def to_nnx(self, remat: str | None = None) -> JinaEncoderNNX:
        """The encoder with this model's weights and adapters as an `nnx.Module` (`nnx.py`):
        a submodule for users' NNX models, trainable with `nnx.Optimizer`. The weights are
        shared until either side updates them; `model.update(encoder.weights())` brings what
        was trained there back here."""
        return JinaEncoderNNX(
            self.config,
            self.params,
            self.adapters,
            self.scales,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=remat,
        )

    def forward_inputs(
        self,
        input_ids,
        attention_mask=None,
        task=None,
        *,
        lengths=None,
        merge: bool = True,
        adapters: AdapterSet | None = None,
    ) -> dict:
        """Checked inputs of the compiled forward: ids, padding (`lengths` for right-padded
        rows, else a mask), the task's weights (see `task_inputs` for `merge`) and, for a head
        model, the head's."""
        ids = check_ids(input_ids, self.config)
        if lengths is None:
            mask, lengths = padding(attention_mask, ids.shape)
        else:
            lengths = np.asarray(lengths, np.int32)
            if lengths.shape != (ids.shape[0],):
                raise ValueError(
                    f"lengths has shape {list(lengths.shape)}, expected [{ids.shape[0]}]"
                )
            mask = None
        return {
            "ids": ids,
            "mask": mask,
            "lengths": lengths,
            "head_params": self.head_params,
            **self.task_inputs(task, ids.shape[0], merge, adapters),
        }

    def lower(
        self, input_ids, attention_mask=None, task=None, *, lengths=None, output: str = "outputs"
    ):
        """The lowered forward for these inputs (`.as_text()`, `.compile()`): what runs, without
        running it. output: "outputs", "pooled" or "hidden" (see `CompiledForward.function`)."""
        return self.forward.lower(
            **self.forward_inputs(input_ids, attention_mask, task, lengths=lengths), output=output
        )

    def pooled(self, input_ids, lengths, task=None, *, merge=True, adapters=None):
        """Mean-pooled fp32 [B, H] for right-padded rows of the given lengths (`adapters`: an
        `AdapterSet`, see `task_inputs`)."""
        inputs = self._rows(input_ids, lengths, task, merge, adapters)
        return self.forward(**inputs, output="pooled")

    def prepare_pooled(self, input_ids, lengths, task=None, *, merge=True, adapters=None) -> bool:
        """Readies `pooled`'s executable for these inputs' shapes without running it (see
        `CompiledForward.prepare`); False: only running it compiles it."""
        inputs = self._rows(input_ids, lengths, task, merge, adapters)
        return self.forward.prepare(**inputs, output="pooled")

    def hidden(self, input_ids, lengths, task=None, *, merge=True, adapters=None):
        """last_hidden_state [B, L, H] (compute dtype) for right-padded rows of these lengths."""
        inputs = self._rows(input_ids, lengths, task, merge, adapters)
        return self.forward(**inputs, output="hidden")

    def prepare_hidden(self, input_ids, lengths, task=None, *, merge=True, adapters=None) -> bool:
        """`prepare_pooled` for `hidden`."""
        inputs = self._rows(input_ids, lengths, task, merge, adapters)
        return self.forward.prepare(**inputs, output="hidden")

    def _rows(self, input_ids, lengths, task, merge: bool, adapters: AdapterSet | None) -> dict:
        """`forward_inputs` for right-padded rows of these lengths (no attention mask)."""
        return self.forward_inputs(
            input_ids, None, task, lengths=lengths, merge=merge, adapters=adapters
        )

    def run(self, input_ids, attention_mask=None, task=None):
        """The compiled forward's output (a head model's: its head's) for these inputs."""
        return self.forward(**self.forward_inputs(input_ids, attention_mask, task))

    def __call__(self, input_ids, attention_mask=None, task=None) -> EncoderOutput:
        """input_ids, attention_mask: int [B, L] (numpy or jax). task: None (no adapter), a task
        name, or a list with one name (or None) per row."""
        return self.run(input_ids, attention_mask, task)

    @property
    def tokenizer(self):
        """The checkpoint's `tokenizer.json` through `tokenizers` (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source)
        return self._tokenizer

    # The keywords of `encode.encode`, packed (the formatter would write one a line).
    def encode(
        self, texts, task=None, *, prompt=None, batch_size: int = 32,
        max_length: int | None = None, truncate_dim: int | None = None, normalize: bool = True,
        show_progress_bar: bool | None = None, max_tokens_per_batch: int = 16384,
        window: int = DEFAULT_WINDOW, precision: str = "float32", ranges=None,
        output_value: str = "sentence_embedding",
    ):  # fmt: skip
        """Sentence embeddings, as the release's `encode` computes them.

        texts: a string (returns [D]), or a list or any iterable of strings (returns [N, D]),
          float32 numpy.
        task: a task name (its instruction is prepended and its adapter used), None (no adapter,
          no instruction), or a list with one task per text. prompt: replaces the instruction.
        max_length: tokens per text, `<s>`/`</s>` included (default 8192, at most the model's
          limit); longer texts are truncated. truncate_dim: Matryoshka dimension, applied before
          normalisation. Batches hold at most `batch_size` rows and `max_tokens_per_batch`
          padded tokens; texts are sorted by length within windows of `window` texts. The
          progress bar (stderr) is on by default for long jobs only.
        precision: "float32", or quantised as sentence-transformers' `quantize_embeddings` does,
          after truncation and normalisation: "int8"/"uint8" (256 buckets per dimension between
          `ranges` [2, D] = per-dimension min and max, by default those of these embeddings),
          "binary"/"ubinary" (one bit per dimension, packed: [N, D / 8]).
        output_value: "sentence_embedding", or "token_embeddings": a list with one float32
          [n_tokens, hidden] array per text, the final hidden states of its real tokens
          (instruction and `<s>`/`</s>` included).
        """
        arguments = dict(locals())  # the first statement: the arguments alone
        del arguments["self"]
        return encode(self, **arguments)

    def encode_late_chunks(self, documents, task="retrieval.passage", **kwargs):
        """Late chunking: per document, (embeddings float32 [n_chunks, D], spans [(start, end),
        ...] in character offsets of the document). The whole document goes through the
        encoder (in overlapping windows of `max_length` tokens when longer); each chunk is the
        mean of its tokens' final states. Keyword arguments: spans (per document, a list of
        (start, end)), chunk_tokens, max_length (default 8192), overlap (default a quarter of
        a window, at most 512 tokens), truncate_dim,
        normalize, batch_size, prompt, max_tokens_per_batch, show_progress_bar. See
        `late_chunking.py` for the rules."""
        return encode_late_chunks(self, documents, task, **kwargs)

    def encode_query(self, texts, **kwargs):
        """`encode(texts, task="retrieval.query", ...)`: queries for retrieval, with their
        instruction and adapter."""
        return self._encode_as("retrieval.query", texts, kwargs)

    def encode_document(self, texts, **kwargs):
        """`encode(texts, task="retrieval.passage", ...)`: documents to index for retrieval,
        with their instruction and adapter."""
        return self._encode_as("retrieval.passage", texts, kwargs)

    def _encode_as(self, task, texts, kwargs):
        if "task" in kwargs:
            raise TypeError(
                f"this method encodes with task {task!r}; call encode(task=...) for another task"
            )
        return self.encode(texts, task=task, **kwargs)

    def iter_encode(self, texts, task=None, **kwargs):
        """`encode` as an iterator: one float32 [D] embedding per text of `texts` (any iterable
        of strings, e.g. a file read line by line), in input order, holding at most two windows
        of texts in memory. Same keyword arguments as `encode`."""
        return iter_encode(self, texts, task=task, **kwargs)


def check_ids(input_ids, cfg: JinaConfig) -> np.ndarray:
    """input_ids as int32 [B, L], checked against the vocabulary and the position limit."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integers, got {ids.dtype}")
    if ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(
            f"sequence length {ids.shape[1]} exceeds max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )
    bad = np.argwhere((ids < 0) | (ids >= cfg.vocab_size))
    if len(bad):
        r, c = bad[0]
        raise ValueError(
            f"input_ids[{r}, {c}] = {ids[r, c]} is outside the vocabulary [0, {cfg.vocab_size})"
        )
    return ids.astype(np.int32)


def padding(attention_mask, shape):
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
