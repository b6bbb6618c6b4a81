"""The `jina-jax` command line: `jina-jax convert SRC DST ...`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jina-jax")
    commands = parser.add_subparsers(dest="command", required=True)
    from convert.__main__ import build_parser, run as run_convert

    build_parser(commands.add_parser("convert", help="convert a checkpoint to a jina-jax folder"))
    args = parser.parse_args(argv)
    if args.command == "convert":
        return run_convert(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
