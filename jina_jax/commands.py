"""What every command line entry point shares (stdlib only, so `--help` stays fast): argument
types that refuse bad values in the parser, the one overwrite rule for outputs, and one way to
end: a one-line error, never a traceback for an expected situation.

Exit codes: 0 done; 1 an input, checkpoint or file was wrong (found while working); 2 the command
line was wrong (a flag, a path, an existing output without --overwrite; found before any work);
130 interrupted (Ctrl-C); 141 the reader of our output went away (`| head`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


class UsageError(Exception):
    """The command line asks for something that cannot be done; nothing has been written."""


def _number(parse, ok, what: str):
    """An argparse type: `parse(text)`, refused unless `ok(value)`, with a message saying `what`
    the flag needs (argparse prefixes the flag)."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    convert.__name__ = what
    return convert


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def add_dtype_flag(parser: argparse.ArgumentParser, help: str, default: str = "float32"):
    """The `--dtype` flag (float32 or bfloat16) of the commands that load or write weights."""
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=default, help=help)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(
    path: str, flag: str, *, overwrite: bool, sources=(), suffixes=None, folder: bool = False
) -> str:
    """Refuses, before any work, an output that cannot or may not be written: a wrong suffix, a
    missing or unwritable parent folder, the wrong kind of thing already there, an existing
    output without --overwrite, an output that is one of the inputs or inside a source folder.
    Returns the absolute path."""
    absolute = os.path.abspath(path)
    if suffixes and not absolute.endswith(tuple(suffixes)):
        raise UsageError(f"{flag} must end in {' or '.join(suffixes)}, got {path}")
    parent = os.path.dirname(absolute)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {parent} is not writable")
    for source in sources:
        if source is None or source == "-" or not os.path.exists(source):
            continue
        if os.path.exists(absolute) and os.path.samefile(absolute, source):
            raise UsageError(f"{flag} {path} is also the input; write somewhere else")
        if os.path.isdir(source) and _inside(absolute, source):
            raise UsageError(
                f"{flag} {path} is inside the source folder {source}; write somewhere else"
            )
    if os.path.lexists(absolute):
        if folder and not os.path.isdir(absolute):
            raise UsageError(f"{flag} {path} exists and is not a folder")
        if not folder and os.path.isdir(absolute):
            raise UsageError(f"{flag} {path} is a folder; name a file")
        if not overwrite:
            raise UsageError(f"{flag} {path} already exists (add --overwrite to replace it)")
    return absolute


def run_guarded(command, args, target: str | None = None) -> int:
    """Runs `command(args)`, turning the expected ways of stopping into one line and an exit
    code: UsageError -> 2; ValueError/TypeError/OSError (bad input, checkpoint or file) -> 1;
    Ctrl-C -> 130, saying what was not written; a closed output pipe -> 141, silently."""
    try:
        code = command(args)
        # Done, outputs in place: a Ctrl-C now would only turn a finished run into a traceback
        # during interpreter shutdown.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return code
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = (
            f": {target} was not written (anything already there is unchanged)" if target else ""
        )
        print(f"interrupted{where}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away: nothing more to say, and nothing may be printed to it either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (ValueError, TypeError, OSError) as e:
        if isinstance(e, OSError) and e.filename:
            message = f"{e.filename}: {e.strerror or e}"
        else:
            message = str(e)
        print(f"error: {message}", file=sys.stderr)
        return 1
