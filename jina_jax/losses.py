"""Label-taking losses of the heads, as pure jnp functions (the reference's semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
    """Mean cross-entropy over the labels that are not `ignore_index`.

    logits: [..., C]; labels: int [...]. Returns a scalar (NaN if every label is ignored, as
    PyTorch's `CrossEntropyLoss` does).
    """
    logits = logits.astype(jnp.float32)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)


def masked_lm_loss(logits, labels):
    """logits: [B, L, V]; labels: int [B, L] with -100 at positions that are not predicted."""
    return cross_entropy(logits, labels)


def token_classification_loss(logits, labels):
    """logits: [B, L, C]; labels: int [B, L] with -100 for ignored tokens (padding, sub-words)."""
    return cross_entropy(logits, labels)


def sequence_classification_loss(logits, labels, problem_type: str | None = None):
    """logits: [B, C]. problem_type: "regression" (MSE), "single_label_classification" (CE) or
    "multi_label_classification" (BCE with logits); None infers it as the reference does:
    one label -> regression, integer labels -> single label, else multi label."""
    logits = logits.astype(jnp.float32)
    num_labels = logits.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        labels = labels.astype(jnp.float32)
        if num_labels == 1:
            return jnp.mean(jnp.square(logits.reshape(-1) - labels.reshape(-1)))
        return jnp.mean(jnp.square(logits - labels))
    if problem_type == "single_label_classification":
        return cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    if problem_type == "multi_label_classification":
        labels = labels.astype(jnp.float32)
        # log(sigmoid(x)) and log(1 - sigmoid(x)) in their stable forms.
        loss = -(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits))
        return jnp.mean(loss)
    raise ValueError(
        f"unknown problem_type {problem_type!r}; expected 'regression', "
        "'single_label_classification' or 'multi_label_classification'"
    )


def span_loss(start_logits, end_logits, start_positions, end_positions):
    """Extractive QA: mean of the start and end cross-entropies. start/end logits: [B, L];
    positions: int [B]. Positions outside the sequence are clamped to L and then ignored."""
    length = start_logits.shape[1]
    start = jnp.clip(start_positions.reshape(-1), 0, length)
    end = jnp.clip(end_positions.reshape(-1), 0, length)
    return (
        cross_entropy(start_logits, start, ignore_index=length)
        + cross_entropy(end_logits, end, ignore_index=length)
    ) / 2


def _unit(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def info_nce(
    queries, positives, negatives=None, temperature: float = 0.05, symmetric: bool = False
):
    """In-batch-negatives contrastive loss (InfoNCE) on cosine similarities.

    queries, positives: [B, H], row i of each a pair; negatives: [N, H] hard negatives shared by
    every query, or None. Query i must pick passage i among the B positives and N negatives.
    `symmetric` adds the passages-pick-their-query direction (over the queries) and averages.
    Returns (loss, accuracy of the query -> passage direction).
    """
    q, p = _unit(queries), _unit(positives)
    candidates = p if negatives is None else jnp.concatenate([p, _unit(negatives)], 0)
    labels = jnp.arange(q.shape[0])
    # [B, B + N]
    logits = q @ candidates.T / temperature
    loss = cross_entropy(logits, labels)
    if symmetric:
        # [B, B]
        loss = (loss + cross_entropy(p @ q.T / temperature, labels)) / 2
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, accuracy


def cosent(first, second, scores, scale: float = 20.0):
    """CoSENT: every pair (i, j) whose gold score orders i above j pays when the cosine of pair j
    is higher: log(1 + sum exp(scale * (cos_j - cos_i))). first, second: [B, H]; scores: [B]."""
    cos = jnp.sum(_unit(first) * _unit(second), -1) * scale
    # [B, B]: entry (i, j) = cos_j - cos_i, kept where score_i > score_j.
    diff = cos[None, :] - cos[:, None]
    ordered = scores[:, None] > scores[None, :]
    diff = jnp.where(ordered, diff, -jnp.inf)
    return jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,)), diff.reshape(-1)]))
