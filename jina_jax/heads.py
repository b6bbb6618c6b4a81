"""Task heads over the encoder: masked LM, sequence / token classification, extractive QA.

Each head is a small Flax module applied to `last_hidden_state`; each head model is the encoder
object plus head parameters. Task adapters apply to the encoder under every head.
"""

from __future__ import annotations

import warnings
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from convert.heads import read_head, saved_num_labels, write_head

from . import losses
from .embedder import JinaEmbeddingsV3
from .encoder import Dtype, LayerNorm, Linear
from .tree import flatten


@flax.struct.dataclass
class LogitsOutput:
    logits: jax.Array  # MaskedLM [B, L, V]; sequence classification [B, C]; token [B, L, C]
    loss: jax.Array | None = None


# Transformers' names for the same shape of output.
MaskedLMOutput = SequenceClassifierOutput = TokenClassifierOutput = LogitsOutput


@flax.struct.dataclass
class QuestionAnsweringOutput:
    start_logits: jax.Array  # [B, L]
    end_logits: jax.Array  # [B, L]
    loss: jax.Array | None = None


class MaskedLMHead(nn.Module):
    """dense -> gelu -> LayerNorm -> decoder tied to the word embeddings (+ its own bias)."""

    vocab_size: int
    hidden_size: int
    eps: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(
        self, h, table, table_lora=None, task_index=None, task_mask=None, deterministic=True
    ):
        """h: [B, L, H]; table: [V, H]; table_lora: a [T, V, R], b [T, R, H] (scale in b)."""
        x = Linear(self.hidden_size, self.dtype, self.param_dtype, name="dense")(h)
        x = jax.nn.gelu(x, approximate=False)
        x = LayerNorm(self.eps, self.dtype, self.param_dtype, name="layer_norm")(x)
        bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,), self.param_dtype)
        # [B, L, V]
        logits = jnp.einsum("blh,vh->blv", x, table.astype(self.dtype)) + bias.astype(self.dtype)
        if table_lora is not None:
            if task_index is None or task_mask is None:
                raise ValueError("MaskedLMHead: table_lora needs task_index and task_mask [B]")
            # The adapted table E + a @ b, without forming it: x @ b^T @ a^T.
            a = table_lora["a"][task_index].astype(self.dtype)
            b = (table_lora["b"][task_index] * task_mask[:, None, None]).astype(self.dtype)
            # [B, L, R]
            xr = jnp.einsum("blh,brh->blr", x, b)
            # [B, L, V]
            logits = logits + jnp.einsum("blr,bvr->blv", xr, a)
        return logits


class SequenceClassificationHead(nn.Module):
    """The `<s>` token -> dropout -> dense -> tanh -> dropout -> out_proj."""

    num_labels: int
    hidden_size: int
    dropout: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, h, deterministic=True):
        drop = nn.Dropout(self.dropout, deterministic=deterministic)
        x = drop(h[:, :1])
        x = jnp.tanh(Linear(self.hidden_size, self.dtype, self.param_dtype, name="dense")(x))
        x = Linear(self.num_labels, self.dtype, self.param_dtype, name="out_proj")(drop(x))
        return x[:, 0]


class TokenClassificationHead(nn.Module):
    num_labels: int
    dropout: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, h, deterministic=True):
        h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
        return Linear(self.num_labels, self.dtype, self.param_dtype, name="classifier")(h)


class QuestionAnsweringHead(nn.Module):
    num_labels: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, h, deterministic=True):
        # [B, L, 2]
        logits = Linear(self.num_labels, self.dtype, self.param_dtype, name="qa_outputs")(h)
        return logits[..., 0], logits[..., 1]


class HeadModel(JinaEmbeddingsV3):
    """The encoder object plus one head; subclasses name the head kind and build the module."""

    # A head model's __call__ returns its head's output (logits), not the encoder's, as
    # Transformers' head classes do: hence the reportIncompatibleMethodOverride ignores below.

    kind: str = ""
    default_num_labels: int | None = 2

    def __init__(
        self,
        *args,
        num_labels: int | None = None,
        seed: int = 0,
        classifier_dropout: float | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        saved = saved_num_labels(self.kind, self.heads)
        if num_labels is not None and saved is not None and num_labels != saved:
            raise ValueError(
                f"num_labels={num_labels}, but the checkpoint's {self.kind} head has "
                f"{saved} labels ({self.source})"
            )
        self.num_labels = num_labels or saved or self.default_num_labels
        self.classifier_dropout = (
            classifier_dropout
            if classifier_dropout is not None
            else self.config.hidden_dropout_prob
        )
        fresh = self._init_head(jax.random.PRNGKey(seed))
        expected = {p: v.shape for p, v in flatten(fresh).items()}
        loaded, unused = read_head(self.kind, self.heads, expected, self.source or "checkpoint")
        if unused:
            warnings.warn(
                f"{self.source}: head weights not used by {type(self).__name__}: {unused}",
                stacklevel=2,
            )
        if loaded is None:
            self.newly_initialized = sorted("/".join(p) for p in expected)
            warnings.warn(
                f"{type(self).__name__}: the checkpoint has no {self.kind} head; newly "
                f"initialised (seed {seed}): {self.newly_initialized}. Train it before "
                "use.",
                stacklevel=2,
            )
            self.head_params = fresh
        else:
            self.newly_initialized = []
            self.head_params = jax.tree_util.tree_map(
                lambda x: jnp.asarray(x, self.param_dtype), loaded
            )

    def head_module(self) -> nn.Module:
        raise NotImplementedError

    def head_tensors(self) -> dict:
        """This model's head as it is now, plus any other head the checkpoint carried. The
        MLM decoder's stored copy of the word embeddings is dropped: Transformers re-ties it."""
        own = write_head(self.kind, jax.device_get(self.head_params))
        stale = {"lm_head.decoder.weight"} if self.kind == "masked_lm" else set()
        others = {k: v for k, v in self.heads.items() if k not in own and k not in stale}
        return {**others, **own}

    def head_signature(self):
        return self.kind, self.num_labels

    def _init_head(self, key):
        cfg = self.config
        h = jnp.zeros((1, 2, cfg.hidden_size), self.dtype)
        # The tied table is an input, not a parameter: a one-row stand-in shapes nothing.
        args = (h, jnp.zeros((1, cfg.hidden_size))) if self.kind == "masked_lm" else (h,)
        # The reference's init: Linear weights N(0, 0.02), biases 0, LayerNorm 1 / 0.
        return self.head_module().init(key, *args)["params"]

    def _labels(self) -> int:
        """num_labels of a classifying head: never None, as its kind's default is 2."""
        assert self.num_labels is not None
        return self.num_labels

    def head_outputs(self, encoded, params, head_params, lora, task_index, task_mask):
        return self.apply_head(encoded, params, head_params, lora, task_index, task_mask)

    def apply_head(
        self, encoded, params, head_params, lora=None, task_index=None, task_mask=None, rng=None
    ) -> Any:
        """The head on an encoder output, as a pure function of the weights: `params` the
        encoder's, `lora`/`task_index`/`task_mask` the adapter inputs the encoder ran with (the
        MLM decoder may need them). `rng` (training) turns the head's dropout on."""
        kw = {} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
        return self.head_module().apply({"params": head_params}, encoded.last_hidden_state, **kw)


class JinaEmbeddingsV3ForMaskedLM(HeadModel):
    """Masked LM. The decoder is the word-embedding table itself. `adapt_decoder` says whether
    a task adapter's word-embedding delta also reaches the decoder: False (default) matches
    `PeftModel` (the adapter wraps the embedding lookup only), True matches the adapter merged
    into the tied table (`merge_and_unload`)."""

    kind = "masked_lm"
    default_num_labels = None

    def __init__(self, *args, adapt_decoder: bool = False, **kwargs):
        self.adapt_decoder = adapt_decoder
        super().__init__(*args, **kwargs)

    def head_module(self):
        cfg = self.config
        return MaskedLMHead(
            cfg.vocab_size, cfg.hidden_size, cfg.layer_norm_eps, self.dtype, self.param_dtype
        )

    def apply_head(
        self, encoded, params, head_params, lora=None, task_index=None, task_mask=None, rng=None
    ) -> Any:
        table = params["embeddings"]["word"]["embedding"]
        table_lora = None
        if self.adapt_decoder and lora is not None:
            table_lora = lora.get("embeddings", {}).get("word")
        if table_lora is not None and task_index is None:
            b = encoded.last_hidden_state.shape[0]
            task_index, task_mask = jnp.zeros((b,), jnp.int32), jnp.ones((b,), self.dtype)
        return self.head_module().apply(
            {"params": head_params},
            encoded.last_hidden_state,
            table,
            table_lora,
            task_index,
            task_mask,
        )

    def __call__(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, input_ids, attention_mask=None, task=None, labels=None
    ) -> MaskedLMOutput:
        logits = self.run(input_ids, attention_mask, task)
        loss = None if labels is None else losses.masked_lm_loss(logits, jnp.asarray(labels))
        return MaskedLMOutput(logits=logits, loss=loss)


class JinaEmbeddingsV3ForSequenceClassification(HeadModel):
    kind = "sequence_classification"

    def head_module(self):
        return SequenceClassificationHead(
            self._labels(),
            self.config.hidden_size,
            self.classifier_dropout,
            self.dtype,
            self.param_dtype,
        )

    def __call__(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        input_ids,
        attention_mask=None,
        task=None,
        labels=None,
        problem_type: str | None = None,
    ) -> SequenceClassifierOutput:
        logits = self.run(input_ids, attention_mask, task)
        loss = (
            None
            if labels is None
            else losses.sequence_classification_loss(logits, jnp.asarray(labels), problem_type)
        )
        return SequenceClassifierOutput(logits=logits, loss=loss)


class JinaEmbeddingsV3ForTokenClassification(HeadModel):
    kind = "token_classification"

    def head_module(self):
        return TokenClassificationHead(
            self._labels(), self.classifier_dropout, self.dtype, self.param_dtype
        )

    def __call__(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, input_ids, attention_mask=None, task=None, labels=None
    ) -> TokenClassifierOutput:
        logits = self.run(input_ids, attention_mask, task)
        loss = (
            None
            if labels is None
            else losses.token_classification_loss(logits, jnp.asarray(labels))
        )
        return TokenClassifierOutput(logits=logits, loss=loss)


class JinaEmbeddingsV3ForQuestionAnswering(HeadModel):
    kind = "question_answering"

    def head_module(self):
        return QuestionAnsweringHead(self._labels(), self.dtype, self.param_dtype)

    def __call__(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, input_ids, attention_mask=None, task=None, start_positions=None, end_positions=None
    ) -> QuestionAnsweringOutput:
        if self.num_labels != 2:
            raise ValueError(
                f"question answering needs num_labels=2 (start, end), got {self.num_labels}"
            )
        start, end = self.run(input_ids, attention_mask, task)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = losses.span_loss(
                start, end, jnp.asarray(start_positions), jnp.asarray(end_positions)
            )
        return QuestionAnsweringOutput(start_logits=start, end_logits=end, loss=loss)
