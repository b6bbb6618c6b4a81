"""The `jina-jax` command line: `jina-jax convert SRC DST ...`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jina-jax")
    commands = parser.add_subparsers(dest="command", required=True)
    from convert.__main__ import build_parser, run as run_convert

    build_parser(commands.add_parser("convert", help="convert a checkpoint to a jina-jax folder"))
    rand = commands.add_parser(
        "random-checkpoint",
        help="write a random-weight checkpoint in the release format (meaningless embeddings; "
             "for offline first runs and benchmarks)")
    rand.add_argument("dst")
    rand.add_argument("--layers", type=int, default=24, help="number of layers (24 = released)")
    rand.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="storage dtype (the release ships bfloat16)")
    rand.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "convert":
        return run_convert(args)
    if args.command == "random-checkpoint":
        from convert.random_checkpoint import write_random_release
        from jina_jax.config import JinaConfig

        write_random_release(args.dst, JinaConfig(num_hidden_layers=args.layers), seed=args.seed,
                             dtype=args.dtype)
        print(f"wrote a random {args.layers}-layer release-format checkpoint to {args.dst} "
              "(its embeddings are meaningless)")
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
