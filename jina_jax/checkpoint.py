"""Model weights <-> checkpoint folders, for the model objects: `load` reads a hub id or a folder
in any supported format onto the device leaf by leaf; `save` writes one of the three formats.
The formats themselves live in `convert/`, which knows nothing of the model objects.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from convert.export import save_original, save_transformers
from convert.formats import Checkpoint, save_native
from convert.formats import load as load_folder

from .config import as_dtype
from .hub import resolve
from .tokenize import load_tokenizer

FORMATS = ("jina_jax", "transformers", "original")


def load(src, *, dtype="float32", revision: str | None = None) -> Checkpoint:
    """The checkpoint at `src` (hub id or folder) with its parameters on the default device in
    `dtype`, each leaf moved there as soon as it is read (host memory holds one at a time), and
    its tokenizer (read first: a bad `tokenizer.json` fails before the weights load)."""
    folder = resolve(src, revision=revision)
    dtype = as_dtype(dtype)
    return load_folder(
        folder,
        dtype=dtype,
        place=lambda x: jnp.asarray(x, dtype=dtype),
        read_tokenizer=lambda path: load_tokenizer(os.path.dirname(path)),
    )


def weights(ckpt: Checkpoint) -> tuple:
    """(config, params, adapters, scales): the positional arguments a model object is built
    from (`JinaEmbeddingsV3`, `JinaEncoderNNX`)."""
    return ckpt.config, ckpt.params, ckpt.adapters, ckpt.scales


def save(folder: str, format: str, ckpt: Checkpoint, head: tuple[str, int | None] | None = None):
    """Writes `ckpt` (device arrays are fetched) to `folder` in `format`.

    "jina_jax": our own folder (parameter dtype as held); "transformers": Transformers'
    `jina_embeddings_v3` weights plus one PEFT LoRA folder per task (fp32); "original": the
    release's single `model.safetensors` with all adapters stacked (fp32). `head` is (kind,
    num_labels) of a head model's own head, which names the architecture in the Transformers
    config. The parent folder must exist.
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not supported; use one of {FORMATS}")
    parent = os.path.dirname(os.path.abspath(os.fspath(folder)))
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"{parent}: the parent folder of {os.fspath(folder)!r} does not exist"
        )
    params, adapters = jax.device_get((ckpt.params, ckpt.adapters))
    if format == "transformers":
        save_transformers(
            folder,
            ckpt.config,
            params,
            adapters,
            ckpt.scales,
            ckpt.folder,
            heads=ckpt.heads,
            head=head,
        )
    elif format == "original":
        save_original(
            folder, ckpt.config, params, adapters, ckpt.scales, ckpt.folder, heads=ckpt.heads
        )
    else:
        save_native(
            folder,
            Checkpoint(
                ckpt.config,
                params,
                adapters,
                ckpt.scales,
                ckpt.heads,
                "jina_jax",
                ckpt.folder or folder,
            ),
        )
