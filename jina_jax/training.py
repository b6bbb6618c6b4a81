"""Fine-tuning: choose what trains, an optax optimizer over just that, a jitted train step.

    trainer = Trainer(model, Contrastive(), optax.adamw(1e-4))  # trains both retrieval adapters
    state = trainer.init(seed=0)
    for queries, passages in data:
        batch = contrastive_batch(model, queries, passages)
        state, metrics = trainer.step(state, batch)
    model.update(trainer.trained(state))                        # trained weights into `model`
    model.save_pretrained("out", format="transformers")

Everything that can train sits in one tree, `variables(model)`:

    {"params": base encoder params, "adapters": {task: factor tree}, "head": head params}

`train` names subtrees of it. Those become `TrainState.params` (fp32 master copies) and are all the
optimizer ever sees; the rest is frozen: an argument of the step, with no gradient, no optimizer
state, and never written.

The forward always takes the unmerged LoRA path (`lora.py`): a differentiable function of the
factors that lets one batch mix tasks, so queries go through `retrieval.query` and passages
through `retrieval.passage` in one forward of one step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import safe_open

from convert.safetensors_io import write

from . import lora as lora_lib
from . import losses
from .attention import choose_implementation
from .config import as_dtype
from .encoder import REMAT_POLICIES, EncoderOutput, JinaEncoder, mean_pool
from .records import read_jsonl
from .sharding import Layout, on_mesh
from .tokenize import check_max_length, tokenize
from .tree import combine, copy_dicts, get_path, set_path

STATE_FORMAT = "jina-jax-train-state-1"


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # the trainable subtrees of `variables(model)`, fp32
    opt_state: Any  # optax state over `params` only
    rng: jax.Array  # PRNG key; step N draws its dropout from fold_in(rng, N)


def variables(model) -> dict:
    """Everything of `model` that can train, as one tree."""
    tree = {"params": model.params, "adapters": dict(model.adapters)}
    if getattr(model, "head_params", None) is not None:
        tree["head"] = model.head_params
    return tree


# --- the forward the objectives see --------------------------------------------------------


class Forward:
    """The encoder inside a train step, over the current variables.

    `forward(seg, ...)` runs segments `(ids [N, L], lengths [N], task)` and returns one
    `EncoderOutput` per segment. Segments of the same width L run as one batch whose rows each
    use their own task (the mixed-task path).
    """

    def __init__(self, trainer: Trainer, tree: dict, rng):
        self.trainer, self.variables, self.rng = trainer, tree, rng
        self._draws = 0

    def next_rng(self):
        """A fresh dropout key (None when dropout is off)."""
        if self.rng is None:
            return None
        self._draws += 1
        return jax.random.fold_in(self.rng, self._draws)

    def run(self, ids, lengths, tasks: Sequence):
        """ids [B, L], lengths [B], tasks: one adapter name (or None) per row (static).
        Returns (EncoderOutput, (lora, task_index, task_mask)): the latter is what heads need."""
        trainer, model = self.trainer, self.trainer.model
        names, task_index, task_mask = lora_lib.task_rows(tasks)
        lora = None
        if names:
            adapters = self.variables["adapters"]
            lora = lora_lib.stack([adapters[n] for n in names], [model.scales[n] for n in names])
        else:
            task_index = task_mask = None
        impl = choose_implementation(
            trainer.dtype,
            model.config.head_dim,
            True,
            ids.shape[1],
            backend=trainer.backend,
            training=True,
        )
        module = trainer.module(impl)
        rng = self.next_rng()
        out = cast(  # apply without `mutable` returns __call__'s output, not a tuple
            EncoderOutput,
            module.apply(
                {"params": self.variables["params"]},
                ids,
                lengths=lengths,
                lora=lora,
                task_index=task_index,
                task_mask=task_mask,
                rngs=None if rng is None else {"dropout": rng},
            ),
        )
        return out, (lora, task_index, task_mask)

    def __call__(self, *segments):
        # Segments of one width run as one batch (each row with its task); different widths
        # run separately, so short queries are not padded to the passages' length.
        model = self.trainer.model
        outputs: list = [None] * len(segments)
        widths = sorted({ids.shape[1] for ids, _, _ in segments})
        for width in widths:
            members = [i for i, (ids, _, _) in enumerate(segments) if ids.shape[1] == width]
            ids = jnp.concatenate([segments[i][0] for i in members])
            lengths = jnp.concatenate([segments[i][1] for i in members])
            tasks = [
                None if segments[i][2] is None else model.resolve_task(segments[i][2])
                for i in members
                for _ in range(segments[i][0].shape[0])
            ]
            out, _ = self.run(ids, lengths, tasks)
            start = 0
            for i in members:
                n = segments[i][0].shape[0]
                pooled = None if out.pooler_output is None else out.pooler_output[start : start + n]
                outputs[i] = EncoderOutput(out.last_hidden_state[start : start + n], pooled)
                start += n
        return outputs


# --- objectives ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Contrastive:
    """InfoNCE with in-batch negatives: query i's positive is passage i, every other passage of
    the batch and every hard negative is a negative. Embeddings are mean-pooled, as `encode`'s.

    Batch: query_ids [B, Lq], query_lengths [B], positive_ids [B, Lp], positive_lengths [B], and
    optionally negative_ids [B, K, Ln], negative_lengths [B, K] (see `contrastive_batch`).
    """

    query_task: str | None = "retrieval.query"
    passage_task: str | None = "retrieval.passage"
    temperature: float = 0.05
    symmetric: bool = False

    @property
    def tasks(self):
        return (self.query_task, self.passage_task)

    def __call__(self, forward: Forward, batch):
        segments = [
            (batch["query_ids"], batch["query_lengths"], self.query_task),
            (batch["positive_ids"], batch["positive_lengths"], self.passage_task),
        ]
        if "negative_ids" in batch:
            b, k, length = batch["negative_ids"].shape
            segments.append(
                (
                    batch["negative_ids"].reshape(b * k, length),
                    batch["negative_lengths"].reshape(b * k),
                    self.passage_task,
                )
            )
        outputs = forward(*segments)
        emb = [mean_pool(o.last_hidden_state, n) for o, (_, n, _) in zip(outputs, segments)]
        loss, accuracy = losses.info_nce(
            emb[0], emb[1], emb[2] if len(emb) > 2 else None, self.temperature, self.symmetric
        )
        return loss, {"accuracy": accuracy}


@dataclasses.dataclass(frozen=True)
class CoSENT:
    """CoSENT on text-matching pairs. Batch: first_ids/first_lengths, second_ids/second_lengths
    ([B, L], [B]) and score [B] (any monotone scale: only the order matters)."""

    task: str | None = "text-matching"
    scale: float = 20.0

    @property
    def tasks(self):
        return (self.task,)

    def __call__(self, forward: Forward, batch):
        segments = [
            (batch["first_ids"], batch["first_lengths"], self.task),
            (batch["second_ids"], batch["second_lengths"], self.task),
        ]
        first, second = [
            mean_pool(o.last_hidden_state, n) for o, (_, n, _) in zip(forward(*segments), segments)
        ]
        return losses.cosent(first, second, batch["score"], self.scale), {}


@dataclasses.dataclass(frozen=True)
class HeadLoss:
    """The head's own loss (the model must be a head model). Batch: ids [B, L], lengths [B], and
    labels (MLM [B, L] with -100; sequence [B] or [B, C]; token [B, L]) or, for QA,
    start_positions / end_positions [B]."""

    task: str | None = None
    problem_type: str | None = None

    @property
    def tasks(self):
        return (self.task,)

    def __call__(self, forward: Forward, batch):
        model = forward.trainer.model
        kind = getattr(model, "kind", None)
        if kind is None:
            raise TypeError(f"HeadLoss needs a head model, got {type(model).__name__}")
        task = None if self.task is None else model.resolve_task(self.task)
        ids = batch["ids"]
        encoded, adapter_inputs = forward.run(ids, batch["lengths"], [task] * ids.shape[0])
        out = model.apply_head(
            encoded,
            forward.variables["params"],
            forward.variables["head"],
            *adapter_inputs,
            rng=forward.next_rng(),
        )
        if kind == "question_answering":
            start, end = out  # the QA head's (start, end) logits
            return losses.span_loss(
                start, end, batch["start_positions"], batch["end_positions"]
            ), {}
        if kind == "sequence_classification":
            return losses.sequence_classification_loss(out, batch["labels"], self.problem_type), {}
        return losses.cross_entropy(out, batch["labels"]), {}


# --- the trainer ---------------------------------------------------------------------------


class Trainer:
    """A jitted `state, metrics = trainer.step(state, batch)` for `model` and an objective.

    train: what trains: adapter/task names, "base" (every encoder weight), "head", "all";
      default: the adapters the objective uses.
    optimizer: any optax GradientTransformation; it only ever sees the trained leaves.
    remat: per-layer rematerialisation policy (see `JinaEncoder`), None keeps all activations.
    accumulate: split each batch into this many micro-batches (rows i, i+k, ... form one) and
      average their gradients before one optimizer update.
    dropout: the config's dropout rates in training (hidden, attention, classifier) or none.
    compute_dtype: e.g. "bfloat16" for bf16 compute; the trained master weights stay fp32.
    mesh: a 1-D data mesh (axis "data") to run on; default: the model's layout after
      `model.shard(...)` (its data axis, and its model axis for tensor parallelism: frozen and
      trained weights and their optimizer state are split as `sharding.Layout` says). Batches
      are split by rows, so their row count must be a multiple of the data axis's size.
      shard_params: split large weights over the data axis too (default: as the model does).
    backend: the platform the step is compiled for, which picks the attention kernel
      (`choose_implementation`); None: this host's (`jina_jax.aot` passes a target's).
    """

    def __init__(
        self,
        model,
        objective,
        optimizer: optax.GradientTransformation,
        *,
        train=None,
        remat: str | None = None,
        accumulate: int = 1,
        dropout: bool = True,
        compute_dtype=None,
        mesh=None,
        shard_params: bool | None = None,
        donate_state: bool = False,
        backend: str | None = None,
    ):
        if remat is not None and remat not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat policy {remat!r}; expected None or one of {sorted(REMAT_POLICIES)}"
            )
        if not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be a positive integer, got {accumulate!r}")
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.backend = backend
        self.remat, self.accumulate, self.dropout = remat, accumulate, dropout
        self.dtype = as_dtype(compute_dtype) if compute_dtype is not None else model.dtype
        # The model's layout (its mesh and axes), or data parallelism over `mesh`.
        self.layout = model.layout if mesh is None else Layout(mesh)
        self.mesh = None if self.layout is None else self.layout.mesh
        for task in objective.tasks:
            if task is not None:
                model.resolve_task(task)  # unknown names fail here, not inside the first step
        self.paths = _train_paths(model, objective, train)
        trainable, frozen = partition(variables(model), self.paths)
        if self.layout is not None and shard_params is not None:
            self.layout = dataclasses.replace(self.layout, shard_params=shard_params)
        self.shard_params = self.layout is not None and self.layout.shard_params
        self.frozen = frozen if self.layout is None else self._put(frozen)
        self.initial = trainable  # the trained leaves' starting values
        self.masks = _qkv_masks(trainable)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,) if donate_state else ())
        self._grad = jax.jit(self._grad_fn)

    @property
    def devices(self) -> int:
        """How many ways a batch's rows split (the data axis's size)."""
        return 1 if self.layout is None else self.layout.rows_multiple

    @property
    def local_devices(self) -> int:
        """How many ways this process's rows split: all of `devices` unless multi-host."""
        return 1 if self.layout is None else self.layout.local_rows_multiple

    def module(self, implementation: str) -> JinaEncoder:
        return JinaEncoder(
            self.model.config,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            implementation=implementation,
            deterministic=not self.dropout,
            remat=self.remat,
        )

    def init(self, seed: int = 0) -> TrainState:
        with on_mesh(self.layout):
            state = self.init_from(self.initial, seed)
            return state if self.layout is None else self._put(state)

    def init_from(self, trainable, seed: int = 0) -> TrainState:
        """A fresh state over `trainable` (a tree shaped like the trained leaves); pure, so
        `jax.eval_shape` can give the state's shapes without allocating anything."""
        # A copy: the state must not share buffers with the model (a donated step frees them).
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32), trainable)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.optimizer.init(params),
            rng=jax.random.PRNGKey(seed),
        )

    def _put(self, tree):
        return self.layout.place(tree)

    # -- the step --

    def _loss(self, params, frozen, batch, rng):
        forward = Forward(self, combine(params, frozen), rng if self.dropout else None)
        if self.mesh is None:
            return self.objective(forward, batch)
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):  # Pallas kernels need it
            return self.objective(forward, batch)

    def _grad_fn(self, params, frozen, batch, rng):
        grad = jax.value_and_grad(self._loss, has_aux=True)
        if self.accumulate == 1:
            (loss, metrics), grads = grad(params, frozen, batch, rng)
        else:
            k = self.accumulate
            # [k, B/k, ...]: micro-batch j holds rows j, j+k, ..., so on a mesh every device
            # keeps its own rows in every micro-batch.
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch
            )

            def one(total, xs):
                j, mb = xs
                (loss, metrics), g = grad(params, frozen, mb, jax.random.fold_in(rng, j))
                return jax.tree_util.tree_map(jnp.add, total, g), (loss, metrics)

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            grads, (loss, metrics) = jax.lax.scan(one, zeros, (jnp.arange(k), micro))
            grads = jax.tree_util.tree_map(lambda g: g / k, grads)
            loss, metrics = loss.mean(), jax.tree_util.tree_map(jnp.mean, metrics)
        return loss, metrics, _apply_masks(grads, self.masks)

    def _step_fn(self, frozen, state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, metrics, grads = self._grad_fn(state.params, frozen, batch, rng)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, _apply_masks(updates, self.masks))
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        # dataclasses.replace is what flax.struct's `state.replace` runs (which its stub lacks)
        new = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    def step(self, state: TrainState, batch: Mapping) -> tuple[TrainState, dict]:
        """One optimizer update on `batch` (a dict of arrays, rows on axis 0)."""
        with on_mesh(self.layout):
            return self._step(self.frozen, state, self.place_batch(batch))

    def lower_step(self, state: TrainState, batch: Mapping):
        """The lowered train step (`.compile().memory_analysis()`); `state` and `batch` may be
        abstract (`jax.eval_shape(trainer.init_from, trainer.initial)`, ShapeDtypeStructs)."""
        return self._step.lower(self.frozen, state, batch)

    def gradients(self, state: TrainState, batch: Mapping, rng=None):
        """(loss, metrics, grads) at `state` without updating (grads in `state.params`' tree)."""
        with on_mesh(self.layout):
            rng = jax.random.fold_in(state.rng, state.step) if rng is None else rng
            return self._grad(state.params, self.frozen, self.place_batch(batch), rng)

    def place_batch(self, batch: Mapping):
        """The batch checked (rows agree and split over devices x accumulate) and on device(s)."""
        if not isinstance(batch, Mapping) or not batch:
            raise TypeError("batch must be a non-empty dict of arrays")
        rows = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
        n = next(iter(rows.values()))
        if any(r != n for r in rows.values()):
            raise ValueError(f"every batch entry needs the same number of rows, got {rows}")
        if n is None:
            raise ValueError(f"batch entries need rows on axis 0, got scalars: {sorted(rows)}")
        # Multi-host: `batch` is this process's rows, spread over its own devices only.
        devices, where = self.local_devices, ""
        if devices != self.devices:
            where = f" of this process (of {self.devices} in {jax.process_count()} processes)"
        if n < devices:
            raise ValueError(
                f"the batch has {n} rows but the train step runs on {devices} "
                f"devices{where}: every device needs at least one row"
            )
        if n % (devices * self.accumulate):
            raise ValueError(
                f"the batch has {n} rows, not a multiple of devices ({devices}"
                f"{where}) x accumulate ({self.accumulate})"
            )
        if self.layout is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return self.layout.global_batch(batch)

    # -- results --

    def trained(self, state: TrainState) -> dict:
        """The trained subtrees of `state` on the host: {"params"?, "adapters"?: {task: factors},
        "head"?}, what `model.update` takes."""
        return jax.device_get(state.params)

    def update_model(self, state: TrainState):
        """The trained weights into the model (`model.update(trainer.trained(state))`), so that
        `encode`, `save_pretrained` and the rest use them. Returns the model."""
        return self.model.update(self.trained(state))

    def save_state(self, path: str, state: TrainState) -> None:
        """Params, optimizer state, step and RNG in one safetensors file (exact values)."""
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{parent}: the folder for the train state does not exist")
        leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
        tensors = {jax.tree_util.keystr(p): np.ascontiguousarray(np.asarray(x)) for p, x in leaves}
        meta = {"format": STATE_FORMAT, "train": json.dumps([list(p) for p in self.paths])}
        write(tensors, path, metadata=meta)  # atomic, and byte-for-byte reproducible

    def restore(self, path: str) -> TrainState:
        """The state `save_state` wrote, checked leaf by leaf against this trainer's."""
        template = jax.eval_shape(self.init)
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(
                    f"{path}: not a jina-jax train state (format {meta.get('format')!r})"
                )
            saved = json.loads(meta.get("train", "[]"))
            if saved != [list(p) for p in self.paths]:
                raise ValueError(
                    f"{path}: trains {saved}, but this trainer trains "
                    f"{[list(p) for p in self.paths]}"
                )
            paths, treedef = jax.tree_util.tree_flatten_with_path(template)
            keys = set(f.keys())
            values = []
            for p, spec in paths:
                key = jax.tree_util.keystr(p)
                if key not in keys:
                    raise ValueError(f"{path}: key {key!r} is missing (was the optimizer changed?)")
                x = f.get_tensor(key)
                if spec.shape == () and x.shape == (1,):  # safetensors stores scalars as [1]
                    x = x.reshape(())
                if x.shape != spec.shape or x.dtype != spec.dtype:
                    raise ValueError(
                        f"{path}: key {key!r} is {x.dtype}{list(x.shape)}, expected "
                        f"{spec.dtype}{list(spec.shape)}"
                    )
                values.append(jnp.asarray(x))
                keys.discard(key)
            if keys:
                raise ValueError(f"{path}: unexpected key(s) {sorted(keys)[:5]}")
        state = jax.tree_util.tree_unflatten(treedef, values)
        return state if self.layout is None else self._put(state)


# --- what trains ---------------------------------------------------------------------------


def _train_paths(model, objective, train) -> list[tuple[str, ...]]:
    if train is None:
        train = [t for t in objective.tasks if t is not None]
        if not train:
            raise ValueError("the objective uses no adapter: say what trains with train=[...]")
    if isinstance(train, str):
        train = [train]
    has_head = getattr(model, "head_params", None) is not None
    paths: list[tuple[str, ...]] = []
    for item in train:
        if item == "all":
            new = [("params",)] + [("adapters", n) for n in model.adapters]
            new += [("head",)] if has_head else []
        elif item == "base":
            new = [("params",)]
        elif item == "head":
            if not has_head:
                raise ValueError(f"train='head', but {type(model).__name__} has no head")
            new = [("head",)]
        else:
            try:
                new = [("adapters", model.resolve_task(item))]
            except (ValueError, TypeError) as e:
                raise ValueError(f"train: {e}; or 'base', 'head', 'all'") from None
        paths += [p for p in new if p not in paths]
    return paths


def partition(tree: Mapping, paths: Sequence[tuple[str, ...]]):
    """(trainable, frozen): the subtrees at `paths`, and the rest (structures disjoint)."""
    frozen = copy_dicts(tree)
    trainable: dict = {}
    for path in paths:
        set_path(trainable, path, get_path(frozen, path[:-1]).pop(path[-1]))
    return trainable, frozen


def _qkv_masks(trainable: Mapping) -> dict:
    """{path of a fused qkv `b`: mask} for trained adapters read from split q/k/v factors."""
    masks = {}
    for name, adapter in trainable.get("adapters", {}).items():
        qkv = adapter.get("layers", {}).get("attn", {}).get("qkv")
        # Shapes only (`jina_jax.aot`): no values to read the blocks from; a mask would only add
        # one multiply to the compiled step.
        if qkv is not None and not isinstance(qkv["b"], jax.ShapeDtypeStruct):
            mask = lora_lib.qkv_block_mask(qkv["b"])
            if not mask.all():
                masks[("adapters", name, "layers", "attn", "qkv", "b")] = jnp.asarray(mask)
    return masks


def _apply_masks(tree, masks: dict):
    if not masks:
        return tree
    tree = copy_dicts(tree)
    for path, mask in masks.items():
        set_path(tree, path, get_path(tree, path) * mask)
    return tree


# --- data ----------------------------------------------------------------------------------


def contrastive_batch(
    model,
    queries: Sequence[str],
    positives: Sequence[str],
    negatives=None,
    *,
    query_task="retrieval.query",
    passage_task="retrieval.passage",
    max_length: int | None = None,
) -> dict:
    """Tokenised arrays for `Contrastive`: each text with its task's instruction, as `encode`
    sees it. negatives: None, or per query one string or a list of K strings (same K for all)."""
    if len(queries) != len(positives):
        raise ValueError(f"{len(queries)} queries but {len(positives)} positives")
    batch = {}
    batch["query_ids"], batch["query_lengths"] = tokenize(
        model, list(queries), query_task, max_length=max_length
    )
    batch["positive_ids"], batch["positive_lengths"] = tokenize(
        model, list(positives), passage_task, max_length=max_length
    )
    if negatives is not None:
        per = [[n] if isinstance(n, str) else list(n) for n in negatives]
        if len(per) != len(queries) or len({len(p) for p in per}) != 1 or not per[0]:
            raise ValueError(
                "negatives needs one entry per query, each with the same number "
                "(at least one) of texts"
            )
        k = len(per[0])
        ids, lengths = tokenize(
            model, [t for p in per for t in p], passage_task, max_length=max_length
        )
        batch["negative_ids"] = ids.reshape(len(per), k, -1)
        batch["negative_lengths"] = lengths.reshape(len(per), k)
    return batch


def read_pairs(path: str) -> list[dict]:
    """JSONL records {"query": str, "positive": str, "negative"?: str | [str]}, with a single
    negative turned into a one-item list; errors name the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, record in read_jsonl(f, path):
            for key in ("query", "positive"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{path}:{number}: {key!r} must be a string")
            neg = record.get("negative")
            if neg is not None and not (
                isinstance(neg, str)
                or (isinstance(neg, list) and neg and all(isinstance(n, str) for n in neg))
            ):
                raise ValueError(
                    f"{path}:{number}: 'negative' must be a string or a non-empty list of strings"
                )
            if isinstance(neg, str):
                record["negative"] = [neg]
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def recall_at_k(
    model,
    queries,
    passages,
    ks=(1, 5, 10),
    *,
    query_task="retrieval.query",
    passage_task="retrieval.passage",
    max_length: int | None = None,
) -> dict:
    """Recall@k of query i retrieving passage i among all passages, through `encode`."""
    max_length = check_max_length(max_length, model.config, 512)
    q = model.encode(list(queries), task=query_task, max_length=max_length, show_progress_bar=False)
    p = model.encode(
        list(passages), task=passage_task, max_length=max_length, show_progress_bar=False
    )
    scores = q @ p.T
    rank = (scores > scores[np.arange(len(q)), np.arange(len(q))][:, None]).sum(1)
    return {f"recall@{k}": float(np.mean(rank < k)) for k in ks}


def cosine_schedule(lr: float, steps: int, warmup: int = 0):
    """Linear warm-up to `lr`, then cosine decay to 0 over the remaining steps."""
    warmup = min(warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup else lr, lr, max(warmup, 1), max(steps, 2), 0.0
    )


__all__ = [
    "TrainState",
    "Trainer",
    "Forward",
    "Contrastive",
    "CoSENT",
    "HeadLoss",
    "variables",
    "partition",
    "combine",
    "contrastive_batch",
    "read_pairs",
    "recall_at_k",
    "cosine_schedule",
]
