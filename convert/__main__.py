"""`python -m convert SRC DST [--dtype float32|bfloat16]` (also `jina-jax convert`)."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="jina-jax convert")
    parser.description = ("Convert a jina-embeddings-v3 checkpoint (hub id or folder, release or "
                          "Transformers+PEFT format) into a jina-jax folder.")
    parser.add_argument("src", help="hub id or local folder")
    parser.add_argument("dst", help="output folder (created)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="storage dtype of the base weights (LoRA factors stay float32)")
    parser.add_argument("--force", action="store_true", help="overwrite a jina-jax folder at DST")
    return parser


def run(args) -> int:
    from jina_jax.config import as_dtype
    from jina_jax.hub import resolve
    from jina_jax.tree import flatten

    from .formats import detect_format, load, save_native
    from .safetensors_io import CheckpointError

    if os.path.exists(os.path.join(args.dst, "config.json")) and not args.force:
        print(f"error: {args.dst} already holds a checkpoint (use --force to overwrite)",
              file=sys.stderr)
        return 2
    dtype = as_dtype(args.dtype)
    try:
        folder = resolve(args.src)
        fmt = detect_format(folder)
        ckpt = load(folder, dtype=dtype)
        save_native(args.dst, ckpt)
    except (CheckpointError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(int(np.prod(v.shape)) for v in flatten(ckpt.params).values())
    print(f"converted {args.src} ({fmt} format): {n:,} base parameters as {args.dtype}, "
          f"{len(ckpt.adapters)} task adapter(s) {list(ckpt.adapters)} -> {args.dst}")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
