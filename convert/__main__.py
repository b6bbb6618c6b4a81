"""`python -m convert SRC DST [--dtype float32|bfloat16]` (also `jina-jax convert`)."""

from __future__ import annotations

import argparse
import os
import sys

from jina_jax.commands import UsageError, add_dtype_flag, check_output, run_guarded


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m convert")
    parser.description = (
        "Convert a jina-embeddings-v3 checkpoint (hub id or folder, release or "
        "Transformers+PEFT format) into a jina-jax folder."
    )
    parser.add_argument("src", help="hub id or local folder")
    parser.add_argument("dst", help="output folder (created whole, or not at all)")
    add_dtype_flag(parser, "storage dtype of the base weights (LoRA factors stay float32)")
    parser.add_argument(
        "--overwrite",
        "--force",
        dest="overwrite",
        action="store_true",
        help="replace an existing DST",
    )
    return parser


def run(args) -> int:
    import numpy as np

    from jina_jax.config import as_dtype
    from jina_jax.hub import resolve
    from jina_jax.tree import flatten

    from .formats import detect_format, load, save_native

    check_output(
        args.dst,
        "DST",
        overwrite=args.overwrite,
        folder=True,
        sources=[args.src] if os.path.exists(args.src) else [],
    )
    try:
        folder = resolve(args.src)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(f"SRC {e}") from None
    fmt = detect_format(folder)
    ckpt = load(folder, dtype=as_dtype(args.dtype))
    save_native(args.dst, ckpt)
    n = sum(int(np.prod(v.shape)) for v in flatten(ckpt.params).values())
    print(
        f"converted {args.src} ({fmt} format): {n:,} base parameters as {args.dtype}, "
        f"{len(ckpt.adapters)} task adapter(s) {list(ckpt.adapters)} -> {args.dst}"
    )
    return 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # before the command started: nothing was written
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return run_guarded(run, args, args.dst)


if __name__ == "__main__":
    sys.exit(main())
