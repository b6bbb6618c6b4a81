"""The manifest of an embedded corpus folder: what was asked (the header: settings, model, input
files, schema, shard plan) and what is done (per finished shard: rows, empty texts skipped,
bytes, sha256).

    {"format": "jina-jax-embeddings", "format_version": 1, "jina_jax_version": "0.1.0",
     "header": {"model": {"source", "config_sha256", "weights_sha256", "tokenizer_sha256"},
                "settings": {"task", "prompt", "max_length", "truncate_dim", "precision",
                             "dtype", "normalize", "ranges_sha256", "text_field", "id_field",
                             "keep_fields", "skip_empty", "shard_rows"},
                "inputs": [{"path", "name", "format", "size", "mtime_ns", "rows"}, ...],
                "dim": D, "schema": [{"name", "type"}, ...],
                "plan": [{"shard", "file", "input", "start", "stop"}, ...]},
     "shards": {"0": {"file", "rows", "skipped_empty", "bytes", "sha256"}, ...},
     "process": {"index": i, "count": n}, "complete": bool}

A shard's input range is rows start + 1 .. stop of inputs[input] (0-based [start, stop)).
One writer per file: a single process owns `manifest.json`; with --shard-count n > 1, process i
writes `manifest.{i:05d}-of-{n:05d}.json`, and at the end, under a lock on the folder, whoever
finds every shard done merges them into `manifest.json` and removes the per-process ones.
Every write is atomic (`files.atomic_file`). Readers merge every manifest in the folder
(`read_manifests`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os

import jax
import numpy as np

from ..files import atomic_file
from .schema import FORMAT, FORMAT_VERSION, MANIFEST

FLAGS = {
    "task": "--task",
    "prompt": "prompt",
    "max_length": "--max-length",
    "truncate_dim": "--truncate-dim",
    "precision": "--precision",
    "dtype": "--dtype",
    "normalize": "normalize",
    "ranges_sha256": "--ranges",
    "text_field": "--text-field",
    "id_field": "--id-field",
    "keep_fields": "--keep-fields",
    "skip_empty": "--skip-empty",
    "shard_rows": "--shard-rows",
}
HASH_BLOCK = 1 << 22


def process_manifest_name(index: int, count: int) -> str:
    """The manifest file of process `index` of `count` (`manifest.json` for one process)."""
    return MANIFEST if count == 1 else f"manifest.{index:05d}-of-{count:05d}.json"


def _sha256_array(h, array) -> None:
    array = np.ascontiguousarray(np.asarray(array))
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.reshape(-1).view(np.uint8).data)


def model_fingerprint(model) -> dict:
    """The model as the manifest records it: its source, and sha256 of its config, of every
    weight (base, adapters and their scales, a head's) and of its tokenizer."""
    config = hashlib.sha256(
        json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode()
    ).hexdigest()
    weights = hashlib.sha256()
    trees = {
        "params": model.params,
        "adapters": model.adapters,
        "scales": model.scales,
        "head": model.head_params,
    }
    for path, leaf in jax.tree_util.tree_flatten_with_path(trees)[0]:
        weights.update(jax.tree_util.keystr(path).encode())
        _sha256_array(weights, leaf)
    # truncation and padding are per-call settings encode sets, not part of the tokenizer
    spec = {
        k: v
        for k, v in json.loads(model.tokenizer.to_str()).items()
        if k not in ("truncation", "padding")
    }
    tokenizer = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return {
        "source": None if model.source is None else str(model.source),
        "config_sha256": config,
        "weights_sha256": weights.hexdigest(),
        "tokenizer_sha256": tokenizer,
    }


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def difference(old: dict, new: dict) -> str | None:
    """One line naming the first way header `new` differs from `old` (None: the same)."""
    if old["model"] != new["model"]:
        keys = [k for k in new["model"] if old["model"].get(k) != new["model"][k]]
        return f"--model differs ({', '.join(k.replace('_sha256', '') for k in keys)})"
    for key, value in new["settings"].items():
        before = old["settings"].get(key)
        if before != value:
            return f"{FLAGS.get(key, key)} differs (was {before!r}, now {value!r})"
    old_files = {f["path"]: f for f in old["inputs"]}
    new_files = {f["path"]: f for f in new["inputs"]}
    for path in new_files.keys() - old_files.keys():
        return f"input {path} is new"
    for path in old_files.keys() - new_files.keys():
        return f"input {path} is no longer an input"
    for path, f in new_files.items():
        for key in ("size", "mtime_ns", "format"):
            if old_files[path][key] != f[key]:
                return f"input {path} changed ({key} {old_files[path][key]} -> {f[key]})"
    if [f["path"] for f in old["inputs"]] != [f["path"] for f in new["inputs"]]:
        return "the inputs are in another order"
    for key in ("dim", "schema", "plan"):
        if old.get(key) != new.get(key):
            return f"the output's {key} differs"
    return None


@dataclasses.dataclass
class Manifest:
    """A manifest in memory: `header` (what was asked) and `shards` ({index: record})."""

    header: dict
    shards: dict[int, dict]
    index: int = 0
    count: int = 1
    version: str = ""

    @property
    def complete(self) -> bool:
        return all(s["shard"] in self.shards for s in self.header["plan"])

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "jina_jax_version": self.version,
            "header": self.header,
            "shards": {str(k): self.shards[k] for k in sorted(self.shards)},
            "process": {"index": self.index, "count": self.count},
            "complete": self.complete,
        }

    def write(self, folder: str, name: str | None = None) -> str:
        """Writes it atomically as `name` (default: this process's manifest)."""
        path = os.path.join(folder, name or process_manifest_name(self.index, self.count))
        with atomic_file(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
        return path


def load(path: str) -> Manifest:
    """One manifest file; a file that is not one is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format_version {data.get('format_version')}, this jina-jax reads {FORMAT_VERSION}"
            )
        return Manifest(
            data["header"],
            {int(k): v for k, v in data["shards"].items()},
            data["process"]["index"],
            data["process"]["count"],
            data["jina_jax_version"],
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable manifest ({e})") from None


def manifest_paths(folder: str) -> list[str]:
    """manifest.json and every per-process manifest in `folder`."""
    paths = glob.glob(os.path.join(glob.escape(folder), "manifest.*-of-*.json"))
    single = os.path.join(folder, MANIFEST)
    return ([single] if os.path.isfile(single) else []) + sorted(paths)


def read_manifests(folder: str) -> list[Manifest]:
    return [load(p) for p in manifest_paths(folder)]


def candidates(manifests: list[Manifest]) -> dict[int, list[dict]]:
    """{shard: its distinct records over several manifests} (a redone shard can leave an older
    record in another process's manifest: the file decides, see `check_shard`)."""
    out: dict[int, list[dict]] = {}
    for m in manifests:
        for k, record in m.shards.items():
            if record not in out.setdefault(k, []):
                out[k].append(record)
    return out


def check_shard(folder: str, records: list[dict], hash_file: bool = True) -> dict | None:
    """The record that the shard's file matches (size, and sha256 unless hash_file=False),
    None when the file is missing or matches none."""
    if not records:
        return None
    path = os.path.join(folder, records[0]["file"])
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    sized = [r for r in records if r["bytes"] == size]
    if not sized:
        return None
    if not hash_file and len(sized) == 1:
        return sized[0]
    digest = file_sha256(path)
    return next((r for r in sized if r["sha256"] == digest), None)


@contextlib.contextmanager
def folder_lock(folder: str):
    """An exclusive lock on the folder itself (flock on its descriptor: no lock file, released
    if the process dies)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
