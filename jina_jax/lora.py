"""Task LoRA adapters: merged weights for one task, the low-rank path for per-row tasks.

An adapter is a tree that mirrors the parameter tree down to the module that owns a weight
(`kernel` for a Linear, `embedding` for an Embedding), with `{"a": A, "b": B}` in place of that
module's leaves, in the parameter's own layout:

    Linear     kernel [I, O]        a [I, R]   b [R, O]     W_t = W + s * a @ b
    Embedding  embedding [V, H]     a [V, R]   b [R, H]     E_t = E + s * a @ b

Layer modules carry a leading [L] axis, as the scanned parameters do. An adapter may cover any
subset of the modules. `s` is one float per task (alpha / rank, or alpha / sqrt(rank) for rsLoRA).

What the forward receives (`lora` argument of the model) is a *stacked* tree: the same paths, with
a task axis T after the layer axis (`a [T, I, R]`, layers `a [L, T, I, R]`) and `s` folded into b.
Each batch row picks its task with `rows` int32[B]; `gate` float[B] switches the delta off for rows
that use no adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

WORD_EMBEDDINGS = ("embeddings", "word")
_LAYERS = "layers"


def low_rank_delta(x, factors, rows, gate):
    """Per-row LoRA update for a Linear.

    x: [B, L, I]; factors: a [T, I, R], b [T, R, O] (scale folded in); rows: int32[B];
    gate: [B]. Returns [B, L, O].
    """
    a = factors["a"][rows].astype(x.dtype)
    b = (factors["b"][rows] * gate[:, None, None]).astype(x.dtype)
    # [B, L, R]
    h = jnp.einsum("bli,bir->blr", x, a)
    # [B, L, O]
    return jnp.einsum("blr,bro->blo", h, b)


def embedding_delta(ids, factors, rows, gate, dtype):
    """Per-row LoRA update for an Embedding, on the gathered rows only.

    ids: int[B, L]; factors: a [T, V, R], b [T, R, H]; rows: int32[B]; gate: [B]. Returns [B, L, H].
    Never materialises a [V, H] table.
    """
    # [B, L, R]
    a = factors["a"][rows[:, None], ids].astype(dtype)
    b = (factors["b"][rows] * gate[:, None, None]).astype(dtype)
    # [B, L, H]
    return jnp.einsum("blr,brh->blh", a, b)


def _walk(tree: Mapping, path=()):
    """Yields (path, {"a", "b"}) for every adapted module of an adapter tree."""
    for key, value in tree.items():
        if isinstance(value, Mapping) and "a" in value and "b" in value:
            yield path + (key,), value
        elif isinstance(value, Mapping):
            yield from _walk(value, path + (key,))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _copy_dicts(tree):
    """Copies the dict structure (not the arrays) so a merged tree shares untouched leaves."""
    if isinstance(tree, Mapping):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree


def _weight_name(module: Mapping) -> str:
    for name in ("kernel", "embedding"):
        if name in module:
            return name
    raise KeyError(f"module has neither kernel nor embedding: {sorted(module)}")


def adapter_paths(adapter: Mapping) -> list[tuple[str, ...]]:
    return [path for path, _ in _walk(adapter)]


def merge(params: Mapping, adapter: Mapping, scale: float, *, keep_word_embeddings: bool = True):
    """Params for one task: `W + scale * a @ b` for every adapted weight.

    With `keep_word_embeddings` (the default) the word-embedding table is left as it is and its
    factors are returned separately, stacked for one task with the scale folded in, so the forward
    adds `a[ids] @ b` on the gathered rows instead of copying a [V, H] table per task.
    Returns (merged params, stacked lora tree for the forward).
    """
    merged = _copy_dicts(params)
    forward_lora: dict = {}
    for path, fac in _walk(adapter):
        if keep_word_embeddings and path == WORD_EMBEDDINGS:
            _set(forward_lora, path, {"a": fac["a"][None], "b": (fac["b"] * scale)[None]})
            continue
        module = _get(merged, path)
        name = _weight_name(module)
        weight = module[name]
        # Merge in fp32 whatever the storage dtype, then store back in it.
        a = jnp.asarray(fac["a"], jnp.float32)
        b = jnp.asarray(fac["b"], jnp.float32)
        if path[0] == _LAYERS:
            # [L, I, O]
            delta = jnp.einsum("lir,lro->lio", a, b)
        else:
            # [I, O]
            delta = a @ b
        module[name] = (jnp.asarray(weight, jnp.float32) + scale * delta).astype(weight.dtype)
    return merged, forward_lora


def stack(adapters: Sequence[Mapping], scales: Sequence[float]):
    """One stacked tree for several tasks (the mixed-batch path).

    Modules missing from some adapters get zero factors there; different ranks are zero-padded to
    the largest, which leaves `a @ b` unchanged. Scales are folded into b.
    """
    shapes: dict[tuple, tuple] = {}
    for adapter in adapters:
        for path, fac in _walk(adapter):
            a_shape, b_shape = np.shape(fac["a"]), np.shape(fac["b"])
            rank = a_shape[-1]
            if path in shapes:
                old_a, old_b, old_rank = shapes[path]
                rank = max(rank, old_rank)
            shapes[path] = (a_shape, b_shape, rank)
    out: dict = {}
    for path, (a_shape, b_shape, rank) in shapes.items():
        layered = path[0] == _LAYERS
        a_list, b_list = [], []
        for adapter, scale in zip(adapters, scales):
            try:
                fac = _get(adapter, path)
                a, b = jnp.asarray(fac["a"]), jnp.asarray(fac["b"]) * scale
            except KeyError:
                a = jnp.zeros(a_shape[:-1] + (rank,), jnp.float32)
                b = jnp.zeros(b_shape[:-2] + (rank,) + b_shape[-1:], jnp.float32)
            pad = rank - a.shape[-1]
            if pad:
                a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
                b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
            a_list.append(a)
            b_list.append(b)
        # Layers: [L, T, ...] so the scan over layers slices the first axis.
        axis = 1 if layered else 0
        _set(out, path, {"a": jnp.stack(a_list, axis), "b": jnp.stack(b_list, axis)})
    return out


def cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


# Short module names (what users pass) -> the module paths an adapter tree uses.
MODULES = {
    "word": ("embeddings", "word"),
    "token_type": ("embeddings", "token_type"),
    "qkv": ("layers", "attn", "qkv"),
    "out": ("layers", "attn", "out"),
    "fc1": ("layers", "mlp", "fc1"),
    "fc2": ("layers", "mlp", "fc2"),
    "pooler": ("pooler", "dense"),
}
# What the release adapts: every Linear and Embedding of the encoder.
DEFAULT_MODULES = ("word", "token_type", "qkv", "out", "fc1", "fc2")


def init_adapter(params: Mapping, rank: int, modules: Sequence[str] = DEFAULT_MODULES, *,
                 seed: int = 0):
    """A fresh adapter whose delta is zero, initialised as PEFT does: a Linear gets a uniform in
    ±1/sqrt(in) and b = 0; an Embedding gets a = 0 and b ~ N(0, 1). Shapes come from `params`."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    unknown = [m for m in modules if m not in MODULES]
    if unknown or not modules:
        raise ValueError(f"unknown adapter module(s) {unknown}; choose from {sorted(MODULES)}")
    key = jax.random.PRNGKey(seed)
    adapter: dict = {}
    for i, name in enumerate(modules):
        path = MODULES[name]
        try:
            module = _get(params, path)
        except KeyError:
            raise ValueError(f"module {name!r} ({'/'.join(path)}) is not in this model") from None
        weight = module[_weight_name(module)]
        lead, (rows, cols) = tuple(weight.shape[:-2]), tuple(weight.shape[-2:])
        k = jax.random.fold_in(key, i)
        if path[0] == "embeddings":
            a = jnp.zeros(lead + (rows, rank), jnp.float32)
            b = jax.random.normal(k, lead + (rank, cols), jnp.float32)
        else:
            bound = 1.0 / np.sqrt(rows)
            a = jax.random.uniform(k, lead + (rows, rank), jnp.float32, -bound, bound)
            b = jnp.zeros(lead + (rank, cols), jnp.float32)
        _set(adapter, path, {"a": a, "b": b})
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
