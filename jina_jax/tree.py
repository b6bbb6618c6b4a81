"""Nested-dict helpers for parameter and adapter trees (plain dicts of arrays).

A path is a tuple of keys, e.g. ("layers", "attn", "qkv", "kernel").
"""

from __future__ import annotations

from collections.abc import Mapping

Path = tuple[str, ...]


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
    """{path: leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def nest(flat: Mapping[Path, object]) -> dict:
    """The nested dict of a {path: leaf} mapping; inverse of `flatten`."""
    out: dict = {}
    for path, value in flat.items():
        set_path(out, path, value)
    return out


def get_path(tree: Mapping, path: Path):
    """The node at `path`; KeyError when any key is missing."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value) -> None:
    """Sets the node at `path`, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def copy_dicts(tree):
    """A copy of the dict structure sharing the leaves (arrays are never copied)."""
    if isinstance(tree, Mapping):
        return {k: copy_dicts(v) for k, v in tree.items()}
    return tree


def combine(a: Mapping, b: Mapping) -> dict:
    """Deep union of two nested dicts with disjoint leaves."""
    out = dict(b)
    for key, value in a.items():
        out[key] = combine(value, b[key]) if key in b and isinstance(value, Mapping) else value
    return out
