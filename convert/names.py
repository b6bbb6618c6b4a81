"""Checkpoint key names -> places in the target parameter tree.

Both PyTorch formats share module names: the release's own (`encoder.layers.3.mixer.Wqkv`,
`emb_ln`, ...), which Transformers also writes to disk, and Transformers' runtime names
(`layers.3.self_attn.q_proj`, `embeddings.LayerNorm`, ...), which PEFT adapters use. Both
spellings are accepted everywhere, with or without the `roberta.` / `base_model.model.` prefixes.

The target tree is the one `JinaEncoder.init` makes (checked by a test with `jax.eval_shape`):
Linear kernels are [in, out] (PyTorch stores [out, in]), layer leaves carry a leading [L] axis,
and the fused qkv kernel's output columns are [q; k; v], heads contiguous.
"""

from __future__ import annotations

import dataclasses
import re

HEAD_PREFIXES = ("lm_head.", "classifier.", "qa_outputs.")
_PREFIXES = ("base_model.model.", "roberta.")
_LAYER = r"(?:encoder\.)?layers\.(?P<layer>\d+)\."

# (regex on the module name, target module path, module kind)
_MODULES = [
    (r"embeddings\.word_embeddings", ("embeddings", "word"), "embed"),
    (r"embeddings\.token_type_embeddings", ("embeddings", "token_type"), "embed"),
    (r"(?:emb_ln|embeddings\.LayerNorm)", ("embeddings", "norm"), "norm"),
    (_LAYER + r"mixer\.Wqkv", ("layers", "attn", "qkv"), "linear"),
    (_LAYER + r"self_attn\.(?P<slot>[qkv])_proj", ("layers", "attn", "qkv"), "linear"),
    (_LAYER + r"(?:mixer\.out_proj|self_attn\.o_proj)", ("layers", "attn", "out"), "linear"),
    (_LAYER + r"mlp\.fc1", ("layers", "mlp", "fc1"), "linear"),
    (_LAYER + r"mlp\.fc2", ("layers", "mlp", "fc2"), "linear"),
    (_LAYER + r"(?:norm1|post_attention_layernorm)", ("layers", "norm1"), "norm"),
    (_LAYER + r"(?:norm2|post_mlp_layernorm)", ("layers", "norm2"), "norm"),
    (r"pooler\.dense", ("pooler", "dense"), "linear"),
]
_MODULES = [(re.compile(p + r"$"), path, kind) for p, path, kind in _MODULES]

# Leaf suffixes of the formats, longest first.
_LEAVES = [
    (".parametrizations.weight.original", "weight"),   # release: base weight under LoRA
    (".parametrizations.weight.0.lora_A", "lora_A"),   # release: stacked task factors
    (".parametrizations.weight.0.lora_B", "lora_B"),
    (".lora_embedding_A", "peft_emb_A"),                # PEFT, Embedding
    (".lora_embedding_B", "peft_emb_B"),
    (".lora_A.weight", "peft_A"),                       # PEFT, Linear
    (".lora_B.weight", "peft_B"),
    (".weight", "weight"),
    (".bias", "bias"),
]
_LEAF_NAMES = {"linear": {"weight": "kernel", "bias": "bias"},
               "embed": {"weight": "embedding"},
               "norm": {"weight": "scale", "bias": "bias"}}


@dataclasses.dataclass(frozen=True)
class Target:
    module: tuple[str, ...]   # e.g. ("layers", "attn", "qkv")
    kind: str                 # "linear" | "embed" | "norm"
    leaf: str                 # "weight", "bias", "lora_A", "peft_A", ...
    layer: int | None = None
    slot: int | None = None   # 0/1/2 for a split q/k/v projection of the fused qkv

    @property
    def param(self) -> str | None:
        """The parameter leaf name in the target tree, for base weights."""
        return _LEAF_NAMES[self.kind].get(self.leaf)


def strip_prefixes(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def is_head_key(key: str) -> bool:
    return strip_prefixes(key).startswith(HEAD_PREFIXES) or key.startswith(HEAD_PREFIXES)


def parse(key: str) -> Target | None:
    """Where a checkpoint key goes, or None when the mapping does not know it."""
    name = strip_prefixes(key)
    for suffix, leaf in _LEAVES:
        if name.endswith(suffix):
            module = name[: -len(suffix)]
            break
    else:
        return None
    for pattern, path, kind in _MODULES:
        m = pattern.match(module)
        if m is None:
            continue
        groups = m.groupdict()
        layer = int(groups["layer"]) if groups.get("layer") is not None else None
        slot = "qkv".index(groups["slot"]) if groups.get("slot") else None
        target = Target(path, kind, leaf, layer, slot)
        if leaf in ("weight", "bias") and target.param is None:
            return None
        return target
    return None


# Target module path -> the release's module name ({} is the layer index).
RELEASE_MODULES = {
    ("embeddings", "word"): "embeddings.word_embeddings",
    ("embeddings", "token_type"): "embeddings.token_type_embeddings",
    ("embeddings", "norm"): "emb_ln",
    ("layers", "attn", "qkv"): "encoder.layers.{}.mixer.Wqkv",
    ("layers", "attn", "out"): "encoder.layers.{}.mixer.out_proj",
    ("layers", "mlp", "fc1"): "encoder.layers.{}.mlp.fc1",
    ("layers", "mlp", "fc2"): "encoder.layers.{}.mlp.fc2",
    ("layers", "norm1"): "encoder.layers.{}.norm1",
    ("layers", "norm2"): "encoder.layers.{}.norm2",
    ("pooler", "dense"): "pooler.dense",
}
# Target parameter leaf -> the PyTorch leaf.
TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def release_key(module: tuple[str, ...], param: str, layer: int | None) -> str:
    """The release's spelling of a target leaf (Transformers writes the same, unprefixed)."""
    return f"{RELEASE_MODULES[module].format(layer)}.{TORCH_LEAF.get(param, param)}"
