"""A random-weight checkpoint in the release's own layout, for offline first runs and
benchmarks. Its embeddings are meaningless: it only shows the machinery working.

`jina-jax random-checkpoint DST [--layers N] [--dtype bfloat16|float32]` writes `config.json`, a
`tokenizer.json` with made-up pieces, and a `model.safetensors` with the released widths (1024 wide, 16 heads, FFN 4096, vocab 250002, five
rank-4 adapters stacked on every Linear and Embedding), tensor by tensor.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jina_jax.architecture import modules
from jina_jax.config import JinaConfig, as_dtype
from jina_jax.files import atomic_file, writes_folder

from .export import release_config
from .safetensors_io import Lazy, write


def release_layout(cfg: JinaConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, kind)} of a release checkpoint for `cfg` (from the architecture table);
    kind picks the initialisation. Every Linear and Embedding carries the stacked task factors,
    as the release's do."""
    t, r = len(cfg.lora_adaptations), cfg.lora_rank
    out: dict = {}
    for module in modules(cfg):
        for layer in range(cfg.num_hidden_layers) if module.layered else [None]:
            name = "roberta." + module.release_name(layer)
            weight = module.shape(cfg)
            if module.kind == "norm":
                out[f"{name}.weight"] = (weight, "norm")
                out[f"{name}.bias"] = (weight, "bias")
                continue
            parametrized = f"{name}.parametrizations.weight"
            if module.kind == "embed":  # weight [V, H]; A [T, V, r], B [T, r, H]
                out[f"{parametrized}.original"] = (weight, "weight")
                out[f"{parametrized}.0.lora_A"] = ((t, weight[0], r), "lora_a")
                out[f"{parametrized}.0.lora_B"] = ((t, r, weight[1]), "lora_b")
                continue
            rows, cols = weight  # weight [out, in]; A [T, r, in], B [T, out, r]
            out[f"{parametrized}.original"] = ((cols, rows), "weight")
            out[f"{parametrized}.0.lora_A"] = ((t, r, rows), "lora_a")
            out[f"{parametrized}.0.lora_B"] = ((t, cols, r), "lora_b")
            out[f"{name}.bias"] = ((cols,), "bias")
    return out


@writes_folder
def write_random_release(
    folder: str, cfg: JinaConfig | None = None, *, seed: int = 0, dtype: str = "bfloat16"
) -> None:  # @writes_folder returns the folder
    """Writes the folder whole or not at all (an existing one is replaced)."""
    cfg = cfg or JinaConfig()
    np_dtype = as_dtype(dtype)
    std = {"weight": 0.02, "bias": 0.02, "norm": 0.05, "lora_a": 0.5, "lora_b": 0.01}

    def maker(key, shape, kind):
        def make():
            # One generator per key: the same key gets the same values whatever else is written.
            rng = np.random.default_rng([seed, int.from_bytes(key.encode()[-8:], "little")])
            x = rng.standard_normal(shape, dtype=np.float32) * std[kind]
            return (x + 1.0 if kind == "norm" else x).astype(np_dtype)

        return make

    tensors = {
        key: Lazy(shape, np_dtype, maker(key, shape, kind))
        for key, (shape, kind) in release_layout(cfg).items()
    }
    write(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = release_config(
        cfg,
        torch_dtype=dtype,
        truncate_dim=None,
        _comment=("random weights written by jina-jax: the embeddings are meaningless"),
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_tokenizer(folder, cfg.vocab_size, seed)


def write_tokenizer(folder: str, vocab_size: int, seed: int = 0) -> str:
    """A `tokenizer.json` shaped like XLM-R's: SentencePiece-style Unigram, `<s>`=0, `<pad>`=1,
    `</s>`=2, `<unk>`=3, `<mask>`=vocab_size-1, template `<s> $A </s>`. The pieces are made up
    (letters, digits, punctuation and letter n-grams, with and without the `▁` word marker), so
    it tokenizes any text, ASCII or not, into ids the model accepts."""
    import itertools
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    n_pieces = vocab_size - len(specials) - 1
    if n_pieces < 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for pieces")
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,;:!?'\"()-"
    pieces, seen = [], set()

    def add(piece):
        if piece not in seen and len(pieces) < n_pieces:
            seen.add(piece)
            pieces.append(piece)

    add("▁")
    for c in chars:
        add("▁" + c)
        add(c)
    for n in itertools.count(2):
        if len(pieces) >= n_pieces:
            break
        for combo in itertools.product(string.ascii_lowercase, repeat=n):
            if len(pieces) >= n_pieces:
                break
            add("▁" + "".join(combo))
            add("".join(combo))
    rng = np.random.default_rng(seed)
    # Longer pieces are rarer; a little noise so ties break the same way every time.
    scores = [-2.0 * len(p) - float(rng.random()) for p in pieces]
    vocab = [(s, 0.0) for s in specials] + list(zip(pieces, scores)) + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    tok.add_special_tokens(specials + ["<mask>"])
    path = os.path.join(folder, "tokenizer.json")
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(tok.to_str())
    return path
