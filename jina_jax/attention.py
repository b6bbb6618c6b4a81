"""Scaled dot-product attention: the one place that picks an implementation.

Padding reaches attention in one of two forms:
- `lengths` int32[B]: every row is right-padded (real tokens first). This is what cuDNN's fused
  flash kernel wants (`query_seq_lengths` / `key_value_seq_lengths`).
- `mask` bool[B, S]: any pattern (left padding, holes). Always correct, never the cuDNN path,
  because a boolean mask becomes a dense bias that cuDNN may refuse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def choose_implementation(dtype, head_dim: int, right_padded: bool, backend: str | None = None) -> str:
    """cuDNN flash attention on GPU for half-precision right-padded batches, XLA everywhere else.

    `jax.nn.dot_product_attention(implementation=None)` always takes the XLA path, so the fused
    kernel has to be asked for by name.
    """
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend in ("gpu", "cuda") and half and right_padded and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def dot_product_attention(q, k, v, *, lengths=None, mask=None, implementation: str = "xla"):
    """Bidirectional attention with padded keys masked.

    q, k, v: [B, L, N, D]; lengths: int32[B] or None; mask: bool[B, L] or None.
    Returns [B, L, N, D]. Softmax runs in fp32 on every path.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"expected one of {IMPLEMENTATIONS}")
    if implementation == "cudnn":
        if lengths is None:
            raise ValueError("the cuDNN attention path needs right-padded `lengths`, not a mask")
        return jax.nn.dot_product_attention(
            q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            implementation="cudnn")
    if mask is None and lengths is not None:
        mask = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
    if mask is not None:
        # [B, 1, 1, S]: broadcast over heads and queries.
        mask = mask.astype(bool)[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
