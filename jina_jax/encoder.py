"""The jina-embeddings-v3 encoder in Flax: XLM-RoBERTa with rotary positions and task LoRA.

    ids -> Embeddings (word + token type, LayerNorm)
        -> scan over Layer x L:  x = LN1(x + Attention(x)); x = LN2(x + MLP(x))   (post-LN)
        -> last_hidden_state [B, L, H], pooler_output tanh(dense(h[:, 0])) [B, H]

The model knows no checkpoint format. `lora` is the stacked adapter tree described in `lora.py`
(None: no adapter): with `task_index`, each row picks its task; without, a single task (the
tree's first) runs for every row through the low-rank path, on the base weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .attention import dot_product_attention
from .config import JinaConfig
from .lora import embedding_delta, low_rank_delta

Dtype = Any
_init = nn.initializers.normal(0.02)
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class EncoderOutput:
    last_hidden_state: jax.Array  # [B, L, H]
    pooler_output: jax.Array | None = None  # [B, H]


def mean_pool(hidden, lengths):
    """Mean over each row's real tokens, in fp32. hidden: [B, L, H]; lengths: int[B] (right
    padding). Returns [B, H]; an empty row gives zeros."""
    real = jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]
    h = hidden.astype(jnp.float32) * real[..., None]
    return h.sum(1) / jnp.maximum(real.sum(1), 1)[:, None].astype(jnp.float32)


def _sub(lora, name):
    return None if lora is None else lora.get(name)


class Linear(nn.Module):
    """y = x @ kernel + bias (+ per-row low-rank delta). kernel [I, O]."""

    features: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, lora=None, task_index=None, task_mask=None):
        kernel = self.param("kernel", _init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x = x.astype(self.dtype)
        # [B, L, O]
        y = jnp.einsum("bli,io->blo", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
        if lora is not None:
            y = y + low_rank_delta(x, lora, task_index, task_mask)
        return y


class Embed(nn.Module):
    """Table lookup (+ per-row low-rank delta on the gathered rows). embedding [V, H]."""

    num_embeddings: int
    features: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, ids, lora=None, task_index=None, task_mask=None):
        table = self.param(
            "embedding", _init, (self.num_embeddings, self.features), self.param_dtype
        )
        # [B, L, H]
        x = jnp.take(table, ids, axis=0).astype(self.dtype)
        if lora is not None:
            x = x + embedding_delta(ids, lora, task_index, task_mask, self.dtype)
        return x


class LayerNorm(nn.Module):
    """Two-pass LayerNorm (mean, then variance of the centred values) with fp32 statistics,
    output in the compute dtype. The one-pass E[x^2] - E[x]^2 form loses parity on large means."""

    eps: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        x = x.astype(jnp.float32)
        centred = x - x.mean(-1, keepdims=True)
        var = jnp.mean(jnp.square(centred), -1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def rope_tables(length: int, head_dim: int, theta: float, dtype):
    """cos, sin: [L, D] for positions 0..L-1, "rotate half" pairing (i with i + D/2)."""
    # The inverse frequencies come from numpy in fp32, as the reference computes them.
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    # [L, D/2]
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    # [L, D]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
    """x: [B, L, N, D]; cos, sin: [L, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class Block(nn.Module):
    """The fields every part of the encoder shares (the parts pass them down unchanged)."""

    config: JinaConfig
    dtype: Dtype
    param_dtype: Dtype
    implementation: str = "xla"  # attention implementation (see `attention.py`)
    deterministic: bool = True  # False: dropout on (needs a "dropout" rng)

    def part(self, cls, name: str):
        return cls(
            self.config,
            self.dtype,
            self.param_dtype,
            self.implementation,
            self.deterministic,
            name=name,
        )


class Attention(Block):
    @nn.compact
    def __call__(self, x, cos, sin, lengths, mask, lora, task_index, task_mask):
        cfg = self.config
        b, l, h = x.shape
        dense = lambda n, name: Linear(n, self.dtype, self.param_dtype, name=name)
        # [B, L, 3H] -> [B, L, 3, N, D]; fused rows are [q; k; v], heads contiguous.
        qkv = dense(3 * h, "qkv")(x, _sub(lora, "qkv"), task_index, task_mask)
        qkv = qkv.reshape(b, l, 3, cfg.num_attention_heads, cfg.head_dim)
        q = apply_rope(qkv[:, :, 0], cos, sin)
        k = apply_rope(qkv[:, :, 1], cos, sin)
        dropout = None
        if not self.deterministic and cfg.attention_probs_dropout_prob > 0:
            dropout = nn.Dropout(cfg.attention_probs_dropout_prob, deterministic=False)
        # [B, L, N, D]
        o = dot_product_attention(
            q,
            k,
            qkv[:, :, 2],
            lengths=lengths,
            mask=mask,
            implementation=self.implementation,
            dropout=dropout,
        )
        return dense(h, "out")(o.reshape(b, l, h), _sub(lora, "out"), task_index, task_mask)


class MLP(Block):
    @nn.compact
    def __call__(self, x, lora, task_index, task_mask):
        cfg = self.config
        y = Linear(cfg.intermediate_size, self.dtype, self.param_dtype, name="fc1")(
            x, _sub(lora, "fc1"), task_index, task_mask
        )
        y = jax.nn.gelu(y, approximate=cfg.hidden_act != "gelu")
        return Linear(cfg.hidden_size, self.dtype, self.param_dtype, name="fc2")(
            y, _sub(lora, "fc2"), task_index, task_mask
        )


class Layer(Block):
    """One post-LayerNorm block; written for `nn.scan` (carry in, carry out)."""

    @nn.compact
    def __call__(self, x, lora, cos, sin, lengths, mask, task_index, task_mask):
        cfg = self.config
        drop = nn.Dropout(cfg.hidden_dropout_prob, deterministic=self.deterministic)
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name=name)
        h = self.part(Attention, "attn")(
            x, cos, sin, lengths, mask, _sub(lora, "attn"), task_index, task_mask
        )
        x = norm("norm1")(x + drop(h))
        h = self.part(MLP, "mlp")(x, _sub(lora, "mlp"), task_index, task_mask)
        x = norm("norm2")(x + drop(h))
        return x, None


class Embeddings(Block):
    @nn.compact
    def __call__(self, ids, type_ids, lora, task_index, task_mask):
        cfg = self.config
        embed = lambda n, name: Embed(n, cfg.hidden_size, self.dtype, self.param_dtype, name=name)
        x = embed(cfg.vocab_size, "word")(ids, _sub(lora, "word"), task_index, task_mask)
        x = x + embed(cfg.type_vocab_size, "token_type")(
            type_ids, _sub(lora, "token_type"), task_index, task_mask
        )
        x = LayerNorm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob, deterministic=self.deterministic)(x)


class Pooler(Block):
    @nn.compact
    def __call__(self, x, lora, task_index, task_mask):
        """x: [B, L, H] -> tanh(dense(x[:, 0])) [B, H]."""
        dense = Linear(self.config.hidden_size, self.dtype, self.param_dtype, name="dense")
        return jnp.tanh(dense(x[:, :1], _sub(lora, "dense"), task_index, task_mask)[:, 0])


class JinaEncoder(Block):
    """The encoder: a pure function of (params, ids, padding, lora) once `apply`'d.

    Attributes:
      config: the architecture.
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      implementation: attention implementation (`attention.IMPLEMENTATIONS`; `attention.py`).
      deterministic: False enables dropout (needs a "dropout" rng).
      scan_layers: stack the layers and `scan` them (compile time independent of depth).
      remat: rematerialise each layer in the backward pass: None (keep every activation),
        "full" (keep only the layer inputs), "dots" (keep matmul outputs) or "dots_no_batch"
        (keep matmuls without batch dimensions: the Linear outputs, not attention's).
    """

    config: JinaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat: str | None = None

    # Packed: the formatter would write one argument a line.
    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, lengths=None, lora=None, task_index=None,
        task_mask=None, token_type_ids=None,
    ) -> EncoderOutput:  # fmt: skip
        """input_ids: int[B, L]. Padding as `lengths` int32[B] (right-padded rows) or
        `attention_mask` [B, L] (any pattern); neither means no padding. `lora`: stacked adapter
        tree or None; `task_index` int32[B] picks each row's task in it, `task_mask` [B] turns it
        off per row; no `task_index`: every row uses the tree's first task.
        """
        cfg = self.config
        b, l = input_ids.shape
        if task_index is None and task_mask is not None:
            raise ValueError("task_mask needs task_index: without it every row uses task 0")
        if lora is not None and task_index is not None:
            task_mask = (
                jnp.ones((b,), self.dtype) if task_mask is None else task_mask.astype(self.dtype)
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.part(Embeddings, "embeddings")(
            input_ids, token_type_ids, _sub(lora, "embeddings"), task_index, task_mask
        )

        cos, sin = rope_tables(l, cfg.head_dim, cfg.rope_theta, self.dtype)
        layer_lora = _sub(lora, "layers")
        layer_fields = (cfg, self.dtype, self.param_dtype, self.implementation, self.deterministic)
        args = (cos, sin, lengths, attention_mask, task_index, task_mask)
        layer_cls = Layer
        if self.remat is not None:
            if self.remat not in REMAT_POLICIES:
                raise ValueError(
                    f"unknown remat policy {self.remat!r}; expected None or one of "
                    f"{sorted(REMAT_POLICIES)}"
                )
            # Under scan, CSE cannot undo the rematerialisation, so it need not be prevented.
            layer_cls = nn.remat(
                Layer, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers
            )
        if self.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                # one axis per argument, as Flax documents (its annotation says a single int)
                in_axes=(0,) + (nn.broadcast,) * len(args),  # pyright: ignore[reportArgumentType]
                length=cfg.num_hidden_layers,
            )
            x, _ = stack(*layer_fields, name="layers")(x, layer_lora, *args)
        else:
            for i in range(cfg.num_hidden_layers):
                li = jax.tree_util.tree_map(lambda t: t[i], layer_lora)  # noqa: B023 (called here)
                x, _ = layer_cls(*layer_fields, name=f"layers_{i}")(x, li, *args)

        pooled = None
        if cfg.add_pooling_layer:
            pooled = self.part(Pooler, "pooler")(x, _sub(lora, "pooler"), task_index, task_mask)
        return EncoderOutput(last_hidden_state=x, pooler_output=pooled)
