"""Head tensors of Transformers' task models -> head parameter trees.

Transformers saves a head model's encoder under `roberta.` and its head at the top level:
`lm_head.*` (MaskedLM; its decoder is tied to the word embeddings), `classifier.dense/out_proj.*`
(SequenceClassification), `classifier.*` (TokenClassification), `qa_outputs.*` (QuestionAnswering).
"""

from __future__ import annotations

import numpy as np

from jina_jax.tree import get_path, set_path

from .safetensors_io import CheckpointError

# {head kind: {checkpoint key: (path in the head tree, is a Linear weight to transpose)}}
LAYOUTS = {
    "masked_lm": {
        "lm_head.dense.weight": (("dense", "kernel"), True),
        "lm_head.dense.bias": (("dense", "bias"), False),
        "lm_head.layer_norm.weight": (("layer_norm", "scale"), False),
        "lm_head.layer_norm.bias": (("layer_norm", "bias"), False),
        "lm_head.bias": (("bias",), False),
    },
    "sequence_classification": {
        "classifier.dense.weight": (("dense", "kernel"), True),
        "classifier.dense.bias": (("dense", "bias"), False),
        "classifier.out_proj.weight": (("out_proj", "kernel"), True),
        "classifier.out_proj.bias": (("out_proj", "bias"), False),
    },
    "token_classification": {
        "classifier.weight": (("classifier", "kernel"), True),
        "classifier.bias": (("classifier", "bias"), False),
    },
    "question_answering": {
        "qa_outputs.weight": (("qa_outputs", "kernel"), True),
        "qa_outputs.bias": (("qa_outputs", "bias"), False),
    },
}
# Tied to other tensors in the reference; stored copies are checked, never loaded.
_TIED = {"lm_head.decoder.weight": "the word embeddings", "lm_head.decoder.bias": "lm_head.bias"}


def read_head(kind: str, heads: dict, expected: dict, source: str):
    """The head tree for `kind` from a checkpoint's head tensors.

    expected: {path: shape} of the head as the model builds it. Returns (tree or None when the
    checkpoint has no such head, keys of other heads that go unused). A head present only in
    part, or with a shape that disagrees (say num_labels), is an error naming the key.
    """
    layout = LAYOUTS[kind]
    present = {k: v for k, v in heads.items() if k in layout}
    unused = sorted(k for k in heads if k not in layout and k not in _TIED)
    if not present:
        return None, unused
    missing = sorted(set(layout) - set(present))
    if missing:
        raise CheckpointError(f"{source}: the {kind} head is incomplete: missing {missing}")
    if (
        kind == "masked_lm"
        and "lm_head.decoder.bias" in heads
        and not np.array_equal(
            np.asarray(heads["lm_head.decoder.bias"]), np.asarray(heads["lm_head.bias"])
        )
    ):
        raise CheckpointError(
            f"{source}: 'lm_head.decoder.bias' differs from 'lm_head.bias', which it is tied to"
        )
    tree: dict = {}
    for key, (path, transpose) in layout.items():
        value = np.asarray(present[key], np.float32)
        value = value.T if transpose else value
        if tuple(value.shape) != tuple(expected[path]):
            hint = " (num_labels?)" if kind != "masked_lm" else ""
            raise CheckpointError(
                f"{source}: head key {key!r} has shape {list(value.shape)} "
                f"(in [in, out] layout) but the model expects "
                f"{list(expected[path])}{hint}"
            )
        set_path(tree, path, value)
    return tree, unused


def saved_num_labels(kind: str, heads: dict) -> int | None:
    key = {
        "sequence_classification": "classifier.out_proj.bias",
        "token_classification": "classifier.bias",
        "question_answering": "qa_outputs.bias",
    }.get(kind)
    return None if key is None or key not in heads else int(np.shape(heads[key])[0])


def write_head(kind: str, tree: dict) -> dict:
    """The checkpoint tensors (PyTorch layout, fp32) of a head tree; inverse of `read_head`.
    The MLM decoder's tied copies are written too, as Transformers writes them."""
    out = {}
    for key, (path, transpose) in LAYOUTS[kind].items():
        value = np.asarray(get_path(tree, path), np.float32)
        out[key] = np.ascontiguousarray(value.T if transpose else value)
    if kind == "masked_lm":
        out["lm_head.decoder.bias"] = out["lm_head.bias"]
    return out
