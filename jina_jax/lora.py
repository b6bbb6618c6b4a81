"""Task LoRA adapters: the low-rank path for one task or per-row tasks, merged weights on request.

An adapter is a tree that mirrors the parameter tree down to the module that owns a weight
(`kernel` for a Linear, `embedding` for an Embedding), with `{"a": A, "b": B}` in place of that
module's leaves, in the parameter's own layout:

    Linear     kernel [I, O]        a [I, R]   b [R, O]     W_t = W + s * a @ b
    Embedding  embedding [V, H]     a [V, R]   b [R, H]     E_t = E + s * a @ b

Layer modules carry a leading [L] axis, as the scanned parameters do. An adapter may cover any
subset of the modules. `s` is one float per task (alpha / rank, or alpha / sqrt(rank) for rsLoRA).

What the forward receives (`lora` argument of the model) is a *stacked* tree: the same paths, with
a task axis T after the layer axis (`a [T, I, R]`, layers `a [L, T, I, R]`) and `s` folded into b.
Each batch row picks its task with `task_index` int32[B]; `task_mask` float[B] switches the delta
off for rows that use no adapter (`task_rows` builds both from one task name per row). Without
`task_index` every row uses the tree's first task through one shared low-rank matmul (no per-row
gather): that is a single task's forward (`single_task`), which never forms `W + s * a @ b`, so
no task costs a second copy of the weights. `merge` still builds that copy for users who want
merged parameters (`params_for(task)`).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .architecture import BY_PATH, DEFAULT_LORA_MODULES, LORA_MODULES
from .tree import copy_dicts, get_path, set_path

WORD_EMBEDDINGS = ("embeddings", "word")


def task_rows(row_tasks: Sequence[str | None], names: Sequence[str] | None = None):
    """(names, task_index int32[B], task_mask float32[B]) for one task name (or None) per row:
    `names` (default: the distinct tasks, sorted) is the order to `stack` their adapters in. A
    fixed `names` (e.g. every adapter) keeps the stacked shapes, hence the compiled forward, the
    same whatever tasks a batch holds."""
    present = {t for t in row_tasks if t is not None}
    names = sorted(present) if names is None else list(names)
    missing = present.difference(names)
    if missing:
        raise ValueError(f"tasks {sorted(missing)} are not among the stacked {names}")
    position: dict[str | None, int] = {n: i for i, n in enumerate(names)}  # None: row 0, masked
    task_index = np.array([position.get(t, 0) for t in row_tasks], np.int32)
    task_mask = np.array([t is not None for t in row_tasks], np.float32)
    return names, task_index, task_mask


def low_rank_delta(x, factors, task_index, task_mask):
    """Per-row LoRA update for a Linear.

    x: [B, L, I]; factors: a [T, I, R], b [T, R, O] (scale folded in); task_index: int32[B];
    task_mask: [B]. Returns [B, L, O]. task_index None: every row uses task 0, unmasked.
    """
    if task_index is None:
        # [B, L, R] -> [B, L, O]: two thin matmuls, far cheaper than merging a [I, O] weight.
        h = jnp.einsum("bli,ir->blr", x, factors["a"][0].astype(x.dtype))
        return jnp.einsum("blr,ro->blo", h, factors["b"][0].astype(x.dtype))
    a = factors["a"][task_index].astype(x.dtype)
    b = (factors["b"][task_index] * task_mask[:, None, None]).astype(x.dtype)
    # [B, L, R]
    h = jnp.einsum("bli,bir->blr", x, a)
    # [B, L, O]
    return jnp.einsum("blr,bro->blo", h, b)


def embedding_delta(ids, factors, task_index, task_mask, dtype):
    """Per-row LoRA update for an Embedding, on the gathered rows only.

    ids: int[B, L]; factors: a [T, V, R], b [T, R, H]; task_index: int32[B]; task_mask: [B].
    Returns [B, L, H]. Never materialises a [V, H] table. task_index None: every row uses task 0,
    unmasked.
    """
    if task_index is None:
        # [B, L, R] -> [B, L, H]
        a = factors["a"][0, ids].astype(dtype)
        return jnp.einsum("blr,rh->blh", a, factors["b"][0].astype(dtype))
    # [B, L, R]
    a = factors["a"][task_index[:, None], ids].astype(dtype)
    b = (factors["b"][task_index] * task_mask[:, None, None]).astype(dtype)
    # [B, L, H]
    return jnp.einsum("blr,brh->blh", a, b)


def adapted_modules(adapter: Mapping, path=()):
    """Yields (module path, {"a", "b"}) for every adapted module of an adapter tree."""
    for key, value in adapter.items():
        if isinstance(value, Mapping) and "a" in value and "b" in value:
            yield path + (key,), value
        elif isinstance(value, Mapping):
            yield from adapted_modules(value, path + (key,))


def weight_name(module_path) -> str:
    """The leaf an adapter adapts in a module: "kernel" (Linear) or "embedding"."""
    return "embedding" if BY_PATH[tuple(module_path)].kind == "embed" else "kernel"


def merge(params: Mapping, adapter: Mapping, scale: float, *, keep_word_embeddings: bool = True):
    """Params for one task: `W + scale * a @ b` for every adapted weight.

    With `keep_word_embeddings` (the default) the word-embedding table is left as it is and its
    factors are returned separately, stacked for one task with the scale folded in, so the forward
    adds `a[ids] @ b` on the gathered rows instead of copying a [V, H] table per task.
    Returns (merged params, stacked lora tree for the forward).
    """
    merged = copy_dicts(params)
    forward_lora: dict = {}
    for path, fac in adapted_modules(adapter):
        if keep_word_embeddings and path == WORD_EMBEDDINGS:
            set_path(forward_lora, path, {"a": fac["a"][None], "b": (fac["b"] * scale)[None]})
            continue
        module = get_path(merged, path)
        name = weight_name(path)
        weight = module[name]
        # Merge in fp32 whatever the storage dtype, then store back in it.
        a = jnp.asarray(fac["a"], jnp.float32)
        b = jnp.asarray(fac["b"], jnp.float32)
        if BY_PATH[path].layered:
            # [L, I, O]
            delta = jnp.einsum("lir,lro->lio", a, b)
        else:
            # [I, O]
            delta = a @ b
        module[name] = (jnp.asarray(weight, jnp.float32) + scale * delta).astype(weight.dtype)
    return merged, forward_lora


def stack(
    adapters: Sequence[Mapping],
    scales: Sequence[float],
    *,
    rank: int | None = None,
    shapes: Mapping | None = None,
):
    """One stacked tree for several tasks (the mixed-batch path).

    Modules missing from some adapters get zero factors there; different ranks are zero-padded to
    the largest, which leaves `a @ b` unchanged. Scales are folded into b. A fixed layout keeps
    the tree's shapes whatever the adapters: `shapes` {module path: (a shape, b shape)} at
    `rank` (every module of the tree; an adapter may not adapt another one nor exceed `rank`).
    """
    if shapes is None:
        shapes = {}
        for adapter in adapters:
            for path, fac in adapted_modules(adapter):
                a_shape, b_shape = np.shape(fac["a"]), np.shape(fac["b"])
                top = a_shape[-1] if rank is None else rank
                if path in shapes:
                    top = max(top, shapes[path][0][-1])
                shapes[path] = (a_shape[:-1] + (top,), b_shape[:-2] + (top,) + b_shape[-1:])
    else:
        for i, adapter in enumerate(adapters):
            for path, fac in adapted_modules(adapter):
                if path not in shapes:
                    raise ValueError(
                        f"adapter {i} adapts {'/'.join(path)}, which the layout does not stack"
                    )
                if np.shape(fac["a"])[-1] > shapes[path][0][-1]:
                    raise ValueError(
                        f"adapter {i} has rank {np.shape(fac['a'])[-1]} at "
                        f"{'/'.join(path)}, over the layout's {shapes[path][0][-1]}"
                    )
    out: dict = {}
    for path, (a_shape, b_shape) in shapes.items():
        layered = BY_PATH[path].layered
        top = a_shape[-1]
        a_list, b_list = [], []
        for adapter, scale in zip(adapters, scales):
            try:
                fac = get_path(adapter, path)
                a, b = jnp.asarray(fac["a"], jnp.float32), jnp.asarray(fac["b"]) * scale
            except KeyError:
                a = jnp.zeros(a_shape, jnp.float32)
                b = jnp.zeros(b_shape, jnp.float32)
            pad = top - a.shape[-1]
            if pad:
                a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
                b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
            a_list.append(a)
            b_list.append(b.astype(jnp.float32))
        # Layers: [L, T, ...] so the scan over layers slices the first axis.
        axis = 1 if layered else 0
        set_path(out, path, {"a": jnp.stack(a_list, axis), "b": jnp.stack(b_list, axis)})
    return out


def max_rank(adapter: Mapping) -> int:
    """The largest rank among an adapter's modules (0 for an empty adapter)."""
    return max((int(np.shape(f["a"])[-1]) for _, f in adapted_modules(adapter)), default=0)


def init_adapter(
    params: Mapping, rank: int, modules: Sequence[str] = DEFAULT_LORA_MODULES, *, seed: int = 0
):
    """A fresh adapter whose delta is zero, initialised as PEFT does: a Linear gets a uniform in
    ±1/sqrt(in) and b = 0; an Embedding gets a = 0 and b ~ N(0, 1). Shapes come from `params`."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    unknown = [m for m in modules if m not in LORA_MODULES]
    if unknown or not modules:
        raise ValueError(f"unknown adapter module(s) {unknown}; choose from {sorted(LORA_MODULES)}")
    key = jax.random.PRNGKey(seed)
    adapter: dict = {}
    for i, name in enumerate(modules):
        path = LORA_MODULES[name]
        try:
            weight = get_path(params, path + (weight_name(path),))
        except KeyError:
            raise ValueError(f"module {name!r} ({'/'.join(path)}) is not in this model") from None
        lead, (rows, cols) = tuple(weight.shape[:-2]), tuple(weight.shape[-2:])
        k = jax.random.fold_in(key, i)
        if BY_PATH[path].kind == "embed":
            a = jnp.zeros(lead + (rows, rank), jnp.float32)
            b = jax.random.normal(k, lead + (rank, cols), jnp.float32)
        else:
            bound = 1.0 / np.sqrt(rows)
            a = jax.random.uniform(k, lead + (rows, rank), jnp.float32, -bound, bound)
            b = jnp.zeros(lead + (rank, cols), jnp.float32)
        set_path(adapter, path, {"a": a, "b": b})
    return adapter


def qkv_block_mask(b) -> np.ndarray:
    """Which entries of a fused qkv `b` [..., R, 3H] may train.

    An adapter read from PEFT keeps separate q, k and v factors, fused here as a block-diagonal
    b: each rank row feeds one of q, k, v. Training must keep those blocks (else it is no longer
    the adapter PEFT would train). A row that feeds exactly one projection stays in it; a row that
    feeds several (the release's fused factors) or none yet (b = 0) is free.
    """
    b = np.asarray(b)
    blocks = b.reshape(b.shape[:-1] + (3, b.shape[-1] // 3))
    # [..., R, 3]
    feeds = np.any(blocks != 0, axis=-1)
    owned = feeds.sum(-1, keepdims=True) == 1
    allowed = np.where(owned, feeds, True)
    return np.repeat(allowed, b.shape[-1] // 3, axis=-1).astype(np.float32)


def word_rank(adapter: Mapping) -> int:
    """The rank of an adapter's word-embedding factors (0 when it has none)."""
    word = adapter.get("embeddings", {}).get("word")
    return 0 if word is None else int(np.shape(word["a"])[-1])


def word_factors(forward_lora, rank: int, vocab_size: int, hidden_size: int):
    """The single-task `lora` argument in one shape for every task (and for no task): the
    word-embedding factors zero-padded to `rank` (the largest among the model's adapters), zeros
    where a task has none. Switching tasks then reuses the compiled forward instead of tracing
    a new one; the zero columns add nothing. None when no adapter has word factors."""
    if rank == 0:
        return None
    word = (forward_lora or {}).get("embeddings", {}).get("word")
    a = jnp.zeros((1, vocab_size, rank), jnp.float32)
    b = jnp.zeros((1, rank, hidden_size), jnp.float32)
    if word is not None:
        r = word["a"].shape[-1]
        a = a.at[..., :r].set(word["a"])
        b = b.at[:, :r].set(word["b"])
    return {"embeddings": {"word": {"a": a, "b": b}}}


def single_task(adapters: Mapping, scales: Mapping, name: str | None):
    """The `lora` argument of a single-task forward (no `task_index`): `name`'s factors as a
    stacked tree with one task (T = 1), in the structure common to all `adapters` (every module
    any of them adapts, each at its largest rank; zeros where `name` has none, zeros throughout
    for `name` None). Every task, and no task, then shares one compiled forward. None when there
    are no adapters."""
    names = sorted(adapters)
    if not names:
        return None
    stacked = stack([adapters[n] for n in names], [scales[n] for n in names])
    t = 0 if name is None else names.index(name)
    out: dict = {}
    for path, fac in adapted_modules(stacked):
        axis = 1 if BY_PATH[path].layered else 0
        one = {k: jax.lax.slice_in_dim(v, t, t + 1, axis=axis) for k, v in fac.items()}
        set_path(
            out, path, one if name is not None else jax.tree_util.tree_map(jnp.zeros_like, one)
        )
    return out


def merged_task(
    params: Mapping,
    adapters: Mapping,
    scales: Mapping,
    name: str | None,
    vocab_size: int,
    hidden_size: int,
):
    """(merged params, word-embedding factors) for one task (None: the base params), every
    task's factors in one shape (`word_factors`): a full copy of the adapted weights, for users
    of the pure function who want merged parameters; the model's own forward never builds it."""
    rank = max((word_rank(a) for a in adapters.values()), default=0)
    if name is None:
        return params, word_factors(None, rank, vocab_size, hidden_size)
    merged, forward_lora = merge(params, adapters[name], scales[name])
    return merged, word_factors(forward_lora, rank, vocab_size, hidden_size)


class TaskCache:
    """Forward inputs per task for one set of weights: a single task's factors (`single_task`:
    small, no weight copy; least recently used, at most `max_tasks`), stacked factors for the
    last mixed set of tasks."""

    def __init__(self, max_tasks: int = 2):
        self.max_tasks = max_tasks
        self.single_tasks: collections.OrderedDict = collections.OrderedDict()
        self.stacked: dict = {}

    def clear(self):
        self.single_tasks.clear()
        self.stacked = {}

    def single(self, name, adapters: Mapping, scales: Mapping):
        """The single-task `lora` of `name` (None: no adapter, zero factors of the same shape)."""
        if name in self.single_tasks:
            self.single_tasks.move_to_end(name)
            return self.single_tasks[name]
        entry = single_task(adapters, scales, name)
        self.single_tasks[name] = entry
        while len(self.single_tasks) > max(1, self.max_tasks):
            self.single_tasks.popitem(last=False)
        return entry

    def mixed(self, names: tuple, adapters: Mapping, scales: Mapping):
        """The stacked factors of `names` (the mixed-batch path)."""
        if names not in self.stacked:
            self.stacked = {names: stack([adapters[n] for n in names], [scales[n] for n in names])}
        return self.stacked[names]
