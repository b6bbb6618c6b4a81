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

from jina_jax import architecture

HEAD_PREFIXES = ("lm_head.", "classifier.", "qa_outputs.")
_PREFIXES = ("base_model.model.", "roberta.")


def _pattern(name: str) -> str:
    """A module name as a regex: "{}" is the layer; layer names may carry "encoder." or not."""
    if name.startswith("encoder."):
        name = name[len("encoder.") :]
    pattern = re.escape(name).replace(r"\{\}", r"(?P<layer>\d+)")
    return r"(?:encoder\.)?" + pattern if "{}" in name else pattern


def _patterns():
    """(regex on the module name, module, slot) for the release's name and every run-time
    name; a module with three run-time names is the fused qkv: q, k, v fill slots 0, 1, 2."""
    out = []
    for module in architecture.MODULES:
        out.append((re.compile(_pattern(module.release) + "$"), module, None))
        for slot, name in enumerate(module.runtime):
            fused = len(module.runtime) > 1
            out.append((re.compile(_pattern(name) + "$"), module, slot if fused else None))
    return out


_PATTERNS = _patterns()

# Leaf suffixes of the formats, longest first.
_LEAVES = [
    (".parametrizations.weight.original", "weight"),  # release: base weight under LoRA
    (".parametrizations.weight.0.lora_A", "lora_A"),  # release: stacked task factors
    (".parametrizations.weight.0.lora_B", "lora_B"),
    (".lora_embedding_A", "peft_emb_A"),  # PEFT, Embedding
    (".lora_embedding_B", "peft_emb_B"),
    (".lora_A.weight", "peft_A"),  # PEFT, Linear
    (".lora_B.weight", "peft_B"),
    (".weight", "weight"),
    (".bias", "bias"),
]


@dataclasses.dataclass(frozen=True)
class Target:
    module: tuple[str, ...]  # e.g. ("layers", "attn", "qkv")
    kind: str  # "linear" | "embed" | "norm"
    leaf: str  # "weight", "bias", "lora_A", "peft_A", ...
    layer: int | None = None
    slot: int | None = None  # 0/1/2 for a split q/k/v projection of the fused qkv

    @property
    def param(self) -> str | None:
        """The parameter leaf name in the target tree, for base weights."""
        names = {torch: ours for ours, torch in architecture.LEAVES[self.kind].items()}
        return names.get(self.leaf)


def strip_prefixes(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def is_head_key(key: str) -> bool:
    return strip_prefixes(key).startswith(HEAD_PREFIXES) or key.startswith(HEAD_PREFIXES)


def parse(key: str) -> Target | None:
    """Where a checkpoint key goes, or None when the mapping does not know it."""
    name = strip_prefixes(key)
    for suffix, leaf in _LEAVES:  # noqa: B007 (leaf is used after the loop)
        if name.endswith(suffix):
            module_name = name[: -len(suffix)]
            break
    else:
        return None
    for pattern, module, slot in _PATTERNS:
        m = pattern.match(module_name)
        if m is None:
            continue
        layer = m.groupdict().get("layer")
        target = Target(module.path, module.kind, leaf, None if layer is None else int(layer), slot)
        if leaf in ("weight", "bias") and target.param is None:
            return None
        return target
    return None
