"""Scaled dot-product attention: the one place that picks an implementation.

- "cudnn": the fused flash kernel through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
- "xla": `jax.nn.dot_product_attention`'s XLA path; materialises [B, N, L, S] logits.
- "blockwise": online softmax over key blocks, for long sequences where those logits do not fit
  (and a CPU fp32 forward from 128 tokens, where it is the faster path).
- "grouped": an exact softmax over all keys, a group of (row, head) pairs at a time, sized so
  that one group's logits stay in cache: a CPU fp32 forward from 384 tokens (faster still).
- "splash": Pallas' splash attention kernel (TPU; a Mosaic custom call), padding as segment ids,
  forward and backward. On a CPU it runs only in interpret mode (`interpret=True`, the tests).

Padding reaches attention in one of two forms:
- `lengths` int32[B]: every row is right-padded (real tokens first). This is what cuDNN's fused
  flash kernel wants (`query_seq_lengths` / `key_value_seq_lengths`).
- `mask` bool[B, S]: any pattern (left padding, holes). Always correct, never the cuDNN path,
  because a boolean mask becomes a dense bias that cuDNN may refuse.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

IMPLEMENTATIONS = ("xla", "cudnn", "blockwise", "grouped", "splash")
# From this many tokens on, the blockwise path replaces the XLA one, whose [B, N, L, S] fp32
# logits take 4 GiB per row at 8192 tokens with 16 heads. On the 2-core CPU the blockwise path
# already ran attention 2x faster at 1024 tokens and equal at 512.
BLOCKWISE_MIN_LENGTH = 1024
# A CPU forward takes the blockwise path from this many tokens: with heads before positions
# both matmuls are plain batched GEMMs, and at 6 layers and the released widths the whole
# forward ran 1.05-1.5x faster than on the XLA path from 128 to 960 tokens (1x960: 657 against
# 908 ms; 4x960: 2.67 against 4.04 s; 32x32: equal). Its backward is not faster at those
# lengths (0.8-1.3x of XLA's), so training keeps BLOCKWISE_MIN_LENGTH; nor was bf16 measured.
CPU_INFERENCE_BLOCKWISE_MIN_LENGTH = 128
# From this many tokens a CPU fp32 forward takes the grouped path instead: the blockwise path
# writes a [B, N, L, block] logits slab far larger than the cache (40 MiB at 1x1580), read back
# by three passes; a group of (row, head) pairs whose logits fill GROUP_LOGITS_BYTES stays in
# the 2 MiB-a-core L2. Measured (6 layers, released widths, whole forward): 2x1664 3.22 -> 2.97 s,
# 2x1024 1.73 -> 1.59 s, 4x464 1.40 -> 1.31 s, 8x416 2.52 -> 2.34 s; below 384 no gain (8x248
# 1.37 vs 1.39 s, 8x144 0.76 vs 0.82 s), so blockwise keeps 128-383. Attention alone, one layer:
# 1x4096 405 vs 659 ms, 1x8192 1.60 vs 2.32 s (one head's 268 MB logits a step: no more memory
# than blockwise's [1, 16, 8192, 512] slab).
CPU_INFERENCE_GROUPED_MIN_LENGTH = 384
GROUP_LOGITS_BYTES = 4 << 20
BLOCK = 512
# The splash kernel's tiles are multiples of 128 positions (a TPU vector register's lanes); a
# width that is no multiple of 128 is padded to one inside `splash_attention`. Below this many
# tokens XLA's own attention is used (a 64-token batch would otherwise compute 128x128 tiles).
SPLASH_MIN_LENGTH = 128
SPLASH_LANES = 128
# The batch axis of a data-parallel mesh (sharding.AXIS; not imported: the model layer below
# knows no sharding module).
DATA_AXIS = "data"


def choose_implementation(
    dtype, head_dim: int, right_padded: bool, length: int = 0, backend: str | None = None,
    training: bool = False,
) -> str:  # fmt: skip
    """cuDNN flash attention on GPU for half-precision right-padded batches; the splash kernel
    on TPU for right-padded batches of at least `SPLASH_MIN_LENGTH` tokens; elsewhere XLA, or
    the blockwise (online-softmax) path for long sequences.

    backend: the platform the program is compiled for ("cpu", "gpu"/"cuda", "tpu"); None: the
    host's `jax.default_backend()`. A compile for another target (`jina_jax.aot`) passes the
    target's. `jax.nn.dot_product_attention(implementation=None)` always takes the XLA path, so
    the fused kernel has to be asked for by name. training: the program also runs the backward
    (a CPU forward alone goes blockwise from `CPU_INFERENCE_BLOCKWISE_MIN_LENGTH` tokens).
    """
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if (
        backend in ("gpu", "cuda")
        and half
        and right_padded
        and head_dim % 8 == 0
        and head_dim <= 128
    ):
        return "cudnn"
    if backend == "tpu" and right_padded and length >= SPLASH_MIN_LENGTH:
        return "splash"
    if backend == "cpu" and not training and not half:  # measured in fp32 only
        if length >= CPU_INFERENCE_GROUPED_MIN_LENGTH:
            return "grouped"
        if length >= CPU_INFERENCE_BLOCKWISE_MIN_LENGTH:
            return "blockwise"
    if length >= BLOCKWISE_MIN_LENGTH:
        return "blockwise"
    return "xla"


def blockwise_attention(q, k, v, mask=None, block: int = BLOCK):
    """Exact attention over key blocks with a running (online) softmax, in fp32.

    q, k, v: [B, L, N, D]; mask: bool [B, S] of valid keys or None. Returns [B, L, N, D] in
    q's dtype. Memory holds one [B, N, L, block] slab of logits instead of [B, N, L, S]; heads
    go before positions so both matmuls of a step are plain batched GEMMs.
    """
    b, l, n, d = q.shape
    s = k.shape[1]
    nblocks = -(-s // block)
    # As many blocks as `block` implies, each just large enough (a multiple of 16): a length
    # that is no multiple of `block` pads a few keys, not up to a whole block.
    block = -(-(-(-s // nblocks)) // 16) * 16  # noqa: B002 (nested ceiling divisions)
    pad = nblocks * block - s
    valid = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    # [B, N, L, D], scaled once here rather than per logit.
    qt = (q * jnp.asarray(d**-0.5, q.dtype)).transpose(0, 2, 1, 3)
    # [K, B, N, block, D] and [K, B, block]: the scan runs over the leading block axis.
    kt = k.reshape(b, nblocks, block, n, d).transpose(1, 0, 3, 2, 4)
    vt = v.reshape(b, nblocks, block, n, d).transpose(1, 0, 3, 2, 4)
    mt = valid.reshape(b, nblocks, block).swapaxes(0, 1)
    very_negative = jnp.finfo(jnp.float32).min

    def step(carry, xs):
        run_max, run_sum, acc = carry
        k_blk, v_blk, m_blk = xs
        # [B, N, L, block]
        logits = jnp.einsum("bnld,bnkd->bnlk", qt, k_blk, preferred_element_type=jnp.float32)
        logits = jnp.where(m_blk[:, None, None, :], logits, very_negative)
        new_max = jnp.maximum(run_max, logits.max(-1))
        probs = jnp.exp(logits - new_max[..., None])
        correction = jnp.exp(run_max - new_max)
        run_sum = run_sum * correction + probs.sum(-1)
        # [B, N, L, D]
        update = jnp.einsum(
            "bnlk,bnkd->bnld", probs.astype(v.dtype), v_blk, preferred_element_type=jnp.float32
        )
        return (new_max, run_sum, acc * correction[..., None] + update), None

    init = (
        jnp.full((b, n, l), very_negative, jnp.float32),
        jnp.zeros((b, n, l), jnp.float32),
        jnp.zeros((b, n, l, d), jnp.float32),
    )
    (_, run_sum, acc), _ = jax.lax.scan(step, init, (kt, vt, mt))
    # [B, L, N, D]
    return (acc / run_sum[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)


def grouped_attention(q, k, v, mask=None, group_bytes: int | None = None):
    """Exact attention, one full softmax over all keys per query, computed for a group of
    (row, head) pairs at a time.

    q, k, v: [B, L, N, D]; mask: bool [B, S] of valid keys or None. Returns [B, L, N, D] in q's
    dtype; logits and softmax in fp32. The B * N pairs go in groups of the most pairs (a divisor
    of B * N) whose fp32 logits fit `group_bytes` (None: `GROUP_LOGITS_BYTES`), one group per
    step of a `lax.map`; when every pair fits, one step without a loop.
    """
    group_bytes = GROUP_LOGITS_BYTES if group_bytes is None else group_bytes
    b, l, n, d = q.shape
    s = k.shape[1]
    pairs = b * n
    pair_bytes = l * s * 4
    group = max(
        g
        for g in range(1, pairs + 1)
        if pairs % g == 0 and (g == 1 or g * pair_bytes <= group_bytes)
    )
    steps = pairs // group
    valid = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
    # [steps, group, L|S, D]: (row, head) pairs flattened row-major, heads before positions.
    qt = (q * jnp.asarray(d**-0.5, q.dtype)).transpose(0, 2, 1, 3).reshape(steps, group, l, d)
    kt = k.transpose(0, 2, 1, 3).reshape(steps, group, s, d)
    vt = v.transpose(0, 2, 1, 3).reshape(steps, group, s, d)
    # [steps, group, S]: each pair's row's valid keys.
    mt = jnp.broadcast_to(valid[:, None, :], (b, n, s)).reshape(steps, group, s)
    very_negative = jnp.finfo(jnp.float32).min

    def attend(xs):
        q_grp, k_grp, v_grp, m_grp = xs
        # [group, L, S]
        logits = jnp.einsum("gld,gsd->gls", q_grp, k_grp, preferred_element_type=jnp.float32)
        logits = jnp.where(m_grp[:, None, :], logits, very_negative)
        probs = jnp.exp(logits - logits.max(-1, keepdims=True))
        # [group, L, D]
        out = jnp.einsum(
            "gls,gsd->gld", probs.astype(v.dtype), v_grp, preferred_element_type=jnp.float32
        )
        return out / probs.sum(-1)[..., None]

    if steps == 1:
        out = attend((qt[0], kt[0], vt[0], mt[0]))[None]
    else:
        out = jax.lax.map(attend, (qt, kt, vt, mt))
    # [B, L, N, D]
    return out.reshape(b, n, l, d).transpose(0, 2, 1, 3).astype(q.dtype)


# Every tile size of the splash kernel (forward, dK/dV and dQ passes): one size serves all.
SPLASH_TILES = (
    "block_q block_kv block_kv_compute block_q_dkv block_kv_dkv block_kv_dkv_compute "
    "block_q_dq block_kv_dq"
).split()


def splash_kernel(length: int, heads: int, interpret: bool):
    """The splash kernel for `heads` heads over `length` (a multiple of 128) positions, every
    query seeing every key (padding comes as segment ids), with tiles as large as divide it.
    Made per trace, never cached: it holds arrays, which must not outlive the trace (a scan's
    body would leak them to the next)."""
    block = next(b for b in (512, 256, 128) if length % b == 0)
    tiles: dict[str, Any] = dict.fromkeys(SPLASH_TILES, block)  # only the tile sizes, all ints
    sizes = splash.BlockSizes(**tiles)
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((length, length))] * heads)
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def splash_attention(q, k, v, lengths, *, interpret: bool = False):
    """Splash attention for right-padded rows. q, k, v: [B, L, N, D]; lengths: int32[B].
    Returns [B, L, N, D] in q's dtype.

    Real tokens are segment 1, padding segment 0, so a real query sees exactly its row's real
    keys (a padded query sees only padding: finite, and masked by every consumer). The kernel
    does not scale q: 1/sqrt(D) is applied here. On a data-parallel mesh (the abstract mesh of
    the trace has a "data" axis) the kernel runs per device under `shard_map`: a Mosaic call is
    not split by XLA's partitioner, which would gather the whole batch onto every device.
    """
    b, l, n, d = q.shape
    padded = max(SPLASH_LANES, -(-l // SPLASH_LANES) * SPLASH_LANES)
    kernel = splash_kernel(padded, n, interpret)

    def per_device(q, k, v, lengths):
        segments = (jnp.arange(padded)[None, :] < lengths[:, None]).astype(jnp.int32)
        # [B, N, L', D]
        qt, kt, vt = (
            jnp.pad(x, ((0, 0), (0, padded - l), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
            for x in (q * jnp.asarray(d**-0.5, q.dtype), k, v)
        )
        out = jax.vmap(
            lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1))
        )(qt, kt, vt, segments)
        # one array: the kernel returns (out, residuals) only when made with save_residuals
        return out.transpose(0, 2, 1, 3)[:, :l].astype(q.dtype)  # pyright: ignore[reportAttributeAccessIssue]

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and DATA_AXIS in mesh.axis_names and mesh.shape[DATA_AXIS] > 1:
        rows = PartitionSpec(DATA_AXIS)
        per_device = jax.shard_map(
            per_device,
            in_specs=(rows,) * 4,
            out_specs=rows,
            axis_names={DATA_AXIS},
            check_vma=False,
        )
    return per_device(q, k, v, lengths)


def attention_with_dropout(q, k, v, mask, dropout):
    """Plain attention whose probabilities pass through `dropout` (training only: the fused and
    blockwise paths have no hook for it). q, k, v: [B, L, N, D]; mask: bool [B, S] or None."""
    d = q.shape[-1]
    # [B, N, L, S]
    logits = jnp.einsum("blnd,bsnd->bnls", q, k, preferred_element_type=jnp.float32) * d**-0.5
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1))
    # [B, L, N, D]
    return jnp.einsum("bnls,bsnd->blnd", probs.astype(v.dtype), v).astype(q.dtype)


def dot_product_attention(
    q, k, v, *, lengths=None, mask=None, implementation: str = "xla", dropout=None
):
    """Bidirectional attention with padded keys masked.

    q, k, v: [B, L, N, D]; lengths: int32[B] or None; mask: bool[B, L] or None.
    Returns [B, L, N, D]. Softmax runs in fp32 on every path. `dropout` (a function on the
    [B, N, L, S] probabilities, training only) forces the plain path whatever `implementation`
    says, which materialises the logits: train long sequences with remat, or without
    attention dropout (a config with attention_probs_dropout_prob=0).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"expected one of {IMPLEMENTATIONS}"
        )
    if dropout is not None:  # training with attention dropout: no fused path has the hook
        if mask is None and lengths is not None:
            mask = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
        return attention_with_dropout(q, k, v, mask, dropout)
    if implementation == "cudnn":
        if lengths is None:
            raise ValueError("the cuDNN attention path needs right-padded `lengths`, not a mask")
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            query_seq_lengths=lengths,
            key_value_seq_lengths=lengths,
            implementation="cudnn",
        )
    if implementation == "splash":
        if lengths is None:
            raise ValueError("the splash attention path needs right-padded `lengths`, not a mask")
        return splash_attention(q, k, v, lengths)
    if mask is None and lengths is not None:
        mask = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, mask)
    if implementation == "grouped":
        return grouped_attention(q, k, v, mask)
    if mask is not None:
        # [B, 1, 1, S]: broadcast over heads and queries.
        mask = mask.astype(bool)[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
