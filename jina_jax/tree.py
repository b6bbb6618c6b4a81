"""Nested-dict helpers for parameter and adapter trees (plain dicts of arrays).

A path is a tuple of keys, e.g. ("layers", "attn", "qkv", "kernel").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Path = tuple[str, ...]


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    """{path: leaf} of a nested dict (leaves of any array type, hence Any)."""
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


def get_path(tree: Mapping, path: Path) -> Any:
    """The node at `path` (a subtree or a leaf); KeyError when any key is missing."""
    node: Any = tree
    for key in path:
        node = node[key]
    return node


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
