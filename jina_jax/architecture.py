"""The one table of the architecture: every weight-carrying module, under every name it has.

Each row says where a module sits in our parameter tree, what kind it is, what the release's
checkpoint calls it (Transformers writes the same names to disk), what Transformers calls it at
run time (the names PEFT adapter keys use; the fused qkv is three projections there), its short
LoRA name, and its weight shape for a config. Parameter shapes, checkpoint key parsing, export
names, the random-checkpoint layout and the LoRA module list are all derived from it; the Flax
modules in `encoder.py` are held to it by a test.

Conventions: a Linear's kernel is [in, out] (PyTorch stores [out, in]); layer modules carry a
leading [L] axis (the layers are scanned); "{}" in a name is the layer index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .config import JinaConfig

Path = tuple[str, ...]

# Our leaf names per module kind, and the PyTorch leaf each one is stored as.
LEAVES = {
    "linear": {"kernel": "weight", "bias": "bias"},
    "embed": {"embedding": "weight"},
    "norm": {"scale": "weight", "bias": "bias"},
}


@dataclasses.dataclass(frozen=True)
class Module:
    path: Path  # in the parameter tree, e.g. ("layers", "attn", "qkv")
    kind: str  # "linear" | "embed" | "norm"
    release: str  # the release's (and Transformers' on-disk) module name
    runtime: tuple[str, ...]  # Transformers' run-time name(s); q, k, v for the fused qkv
    lora: str | None  # short name for adapters (None: never adapted)
    shape: Callable[[JinaConfig], tuple[int, ...]]  # weight per layer: [in, out], [V, H] or [H]
    # Tensor parallelism over a mesh's model axis (Megatron's pairing): "out" splits the output
    # features (kernel's last axis and the bias: qkv, fc1), "in" the input features (out, fc2:
    # XLA sums their partial products), "dim" an embedding's feature axis (the vocabulary,
    # 250002, divides by no usual mesh size); None: replicated. Exact whatever the split:
    # XLA's partitioner reshards where a layout needs it (qkv's [q; k; v] columns, say).
    parallel: str | None = None

    @property
    def layered(self) -> bool:
        return self.path[0] == "layers"

    def leaf_shapes(self, cfg: JinaConfig) -> dict[str, tuple[int, ...]]:
        """{leaf: shape} of this module's parameters, with the [L] axis for layer modules."""
        weight = self.shape(cfg)
        leaves = {
            "linear": {"kernel": weight, "bias": weight[-1:]},
            "embed": {"embedding": weight},
            "norm": {"scale": weight, "bias": weight},
        }[self.kind]
        lead = (cfg.num_hidden_layers,) if self.layered else ()
        return {leaf: lead + shape for leaf, shape in leaves.items()}

    def release_name(self, layer: int | None = None) -> str:
        return self.release.format(layer)


# One row a module; kept one per line (the formatter would put each field on its own line).
# fmt: off
MODULES = (
    Module(("embeddings", "word"), "embed", "embeddings.word_embeddings", ("embeddings.word_embeddings",), "word", lambda c: (c.vocab_size, c.hidden_size), "dim"),
    Module(("embeddings", "token_type"), "embed", "embeddings.token_type_embeddings", ("embeddings.token_type_embeddings",), "token_type", lambda c: (c.type_vocab_size, c.hidden_size)),
    Module(("embeddings", "norm"), "norm", "emb_ln", ("embeddings.LayerNorm",), None, lambda c: (c.hidden_size,)),
    Module(("layers", "attn", "qkv"), "linear", "encoder.layers.{}.mixer.Wqkv", ("layers.{}.self_attn.q_proj", "layers.{}.self_attn.k_proj", "layers.{}.self_attn.v_proj"), "qkv", lambda c: (c.hidden_size, 3 * c.hidden_size), "out"),
    Module(("layers", "attn", "out"), "linear", "encoder.layers.{}.mixer.out_proj", ("layers.{}.self_attn.o_proj",), "out", lambda c: (c.hidden_size, c.hidden_size), "in"),
    Module(("layers", "mlp", "fc1"), "linear", "encoder.layers.{}.mlp.fc1", ("layers.{}.mlp.fc1",), "fc1", lambda c: (c.hidden_size, c.intermediate_size), "out"),
    Module(("layers", "mlp", "fc2"), "linear", "encoder.layers.{}.mlp.fc2", ("layers.{}.mlp.fc2",), "fc2", lambda c: (c.intermediate_size, c.hidden_size), "in"),
    Module(("layers", "norm1"), "norm", "encoder.layers.{}.norm1", ("layers.{}.post_attention_layernorm",), None, lambda c: (c.hidden_size,)),
    Module(("layers", "norm2"), "norm", "encoder.layers.{}.norm2", ("layers.{}.post_mlp_layernorm",), None, lambda c: (c.hidden_size,)),
    Module(("pooler", "dense"), "linear", "pooler.dense", ("pooler.dense",), "pooler", lambda c: (c.hidden_size, c.hidden_size)),
)
# fmt: on
BY_PATH = {m.path: m for m in MODULES}
# Short adapter module names (what users pass to `add_adapter`) -> module paths.
LORA_MODULES = {m.lora: m.path for m in MODULES if m.lora is not None}
# What the release adapts: every Linear and Embedding of the encoder (not the pooler).
DEFAULT_LORA_MODULES = ("word", "token_type", "qkv", "out", "fc1", "fc2")


def modules(cfg: JinaConfig) -> tuple[Module, ...]:
    """The modules a model with this config has (the pooler is optional)."""
    return tuple(m for m in MODULES if m.path[0] != "pooler" or cfg.add_pooling_layer)


def param_shapes(cfg: JinaConfig) -> dict[Path, tuple[int, ...]]:
    """Flat {path: shape} of the encoder's parameters (what `JinaEncoder.init` makes)."""
    return {
        m.path + (leaf,): shape for m in modules(cfg) for leaf, shape in m.leaf_shapes(cfg).items()
    }


def weight_shape(cfg: JinaConfig, path: Path) -> tuple[int, int]:
    """(in, out) of a Linear's kernel or (rows, dim) of an Embedding's table, per layer;
    KeyError for a path that is neither (or absent from this config)."""
    module = BY_PATH.get(path)
    if module is None or module.kind == "norm" or module not in modules(cfg):
        raise KeyError(path)
    rows, cols = module.shape(cfg)  # two axes: a Linear's or an Embedding's (norms raised above)
    return rows, cols


def release_key(path: Path, leaf: str, layer: int | None) -> str:
    """The release's key for one of our leaves (Transformers writes the same, unprefixed)."""
    module = BY_PATH[path]
    return f"{module.release_name(layer)}.{LEAVES[module.kind].get(leaf, leaf)}"
