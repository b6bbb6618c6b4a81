"""Reading safetensors one tensor at a time, with errors that name the file and the key.

The reader parses the header itself and reads each tensor with one positioned read into a fresh
array, so loading holds at most one source tensor at a time and no file pages stay mapped (a
memory-mapped 1 GB file touched end to end would otherwise count fully towards peak RSS). bf16
comes back as `ml_dtypes.bfloat16`. Writing goes through the `safetensors` package.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from jina_jax.files import atomic_file

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where known, the key."""


def no_duplicate_keys(pairs):
    """object_pairs_hook for json: a key given twice is an error (ValueError), never
    last-one-wins."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def parse_json(raw, what: str):
    """`raw` (bytes or str) as JSON; anything else (bad syntax or encoding, nesting deeper than
    Python's recursion limit, a repeated key) is a CheckpointError naming `what`."""
    try:
        return json.loads(raw, object_pairs_hook=no_duplicate_keys)
    except RecursionError:
        raise CheckpointError(f"{what}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{what}: not valid JSON ({e})") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """The header of one safetensors file, and positioned reads of its tensors.

    The header is checked as the format defines it, by arithmetic on its numbers alone (no pass
    over the data, and nothing allocated from a declared size before it is known to fit in the
    file): every entry has a known dtype, a shape of integers >= 0 and `data_offsets` [begin, end]
    with begin <= end holding exactly dtype size x elements bytes; the tensors, ordered by
    offset, tile the data region exactly (no overlap, so no two tensors share bytes; no gap; no
    trailing bytes); `__metadata__` maps strings to strings.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file not found")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(
                    f"{self.path}: not a safetensors file (shorter than its 8-byte header length)"
                )
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors header (header length "
                    f"{n} for a file of {size} bytes)"
                )
            raw = f.read(n)
        try:
            header = parse_json(raw, "header")
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(
                f"{self.path}: corrupt safetensors header (__metadata__ must "
                "map strings to strings)"
            )
        self.metadata = metadata
        self._data_start = 8 + n
        self._entries = {k: self._entry(k, e, size - self._data_start) for k, e in header.items()}
        self._check_tiling(size - self._data_start)

    def _entry(self, key: str, entry, data_size: int):
        """(dtype, shape, begin, end) of one header entry, checked against the data region."""
        bad = lambda why: CheckpointError(  # noqa: E731
            f"{self.path}: corrupt header entry for key {key!r}: {why}"
        )
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise bad(f"{str(entry)[:200]} (needs dtype, shape and data_offsets)")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in _DTYPES:
            raise bad(f"unknown dtype {str(code)[:40]!r}")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise bad(f"shape {str(shape)[:200]} is not a list of integers")
        if any(d < 0 for d in shape):
            raise bad(f"negative dimension in shape {shape}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
        ):
            raise bad(f"data_offsets {str(offsets)[:200]} is not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise bad(f"data_offsets {offsets} are not 0 <= begin <= end")
        dtype = _DTYPES[code]
        # Python integers: exact for any shape (a numpy product would wrap past 2**63).
        nbytes = dtype.itemsize * math.prod(shape)
        if end - begin != nbytes:
            raise CheckpointError(
                f"{self.path}: key {key!r}: {end - begin} bytes do not hold {code} {shape}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{self.path}: truncated file: key {key!r} ends at byte "
                f"{self._data_start + end}, the file has "
                f"{self._data_start + data_size} bytes"
            )
        return dtype, tuple(shape), begin, end, code

    def _check_tiling(self, data_size: int) -> None:
        """The tensors, ordered by offset, cover the data region exactly once."""
        position, previous = 0, None
        for key, (_, _, begin, end, _) in sorted(self._entries.items(), key=lambda kv: kv[1][2:4]):
            if begin < position:
                raise CheckpointError(
                    f"{self.path}: keys {previous!r} and {key!r} share bytes "
                    f"{begin}..{min(end, position)} of the data (overlapping "
                    "data_offsets)"
                )
            if begin > position:
                raise CheckpointError(
                    f"{self.path}: bytes {position}..{begin} of the data "
                    f"belong to no tensor (a gap before key {key!r})"
                )
            position, previous = end, key
        if position != data_size:
            raise CheckpointError(
                f"{self.path}: {data_size - position} byte(s) after the last "
                "tensor belong to no tensor"
            )

    def dtype_code(self, key: str) -> str:
        """The stored dtype's safetensors name ("BF16", "F32", ...)."""
        return self._entries[key][4]

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def read(self, key: str) -> np.ndarray:
        """The tensor as a fresh array in its stored dtype."""
        if key not in self._entries:
            raise CheckpointError(f"{self.path}: no key {key!r}")
        dtype, shape, begin, _, _ = self._entries[key]
        out = np.empty(shape, dtype)
        view = out.reshape(-1).view(np.uint8).data  # a memoryview of `out` itself
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(view)
        if got != out.nbytes:
            raise CheckpointError(f"{self.path}: truncated file while reading key {key!r}")
        return out


class TensorSource:
    """All tensors of one checkpoint: a single file, or shards listed by a `.index.json`."""

    def __init__(self, files: list[SafetensorsFile]):
        self.files = files
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for key in f.keys():
                if key in self._where:
                    raise CheckpointError(
                        f"key {key!r} is in both {self._where[key].path} and {f.path}"
                    )
                self._where[key] = f

    @classmethod
    def open(cls, folder: str, name: str = "model.safetensors") -> TensorSource:
        single = os.path.join(folder, name)
        index = single + ".index.json"
        if os.path.isfile(single):
            return cls([SafetensorsFile(single)])
        if os.path.isfile(index):
            with open(index, "rb") as f:
                weight_map = parse_json(f.read(), index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: unreadable shard index (no weight_map object)")
            shards = set()
            for key, shard in weight_map.items():
                # A shard is a file of this folder: never a path that leads out of it.
                if (
                    not isinstance(shard, str)
                    or os.path.basename(shard) != shard
                    or shard in ("", ".", "..")
                ):
                    raise CheckpointError(
                        f"{index}: key {key!r} maps to {str(shard)[:200]!r}, "
                        "which is not a file name in this folder"
                    )
                shards.add(shard)
            return cls([SafetensorsFile(os.path.join(folder, s)) for s in sorted(shards)])
        raise CheckpointError(f"{folder}: no weights ({name} or {name}.index.json)")

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> str:
        return self._where[key].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    @property
    def name(self) -> str:
        return ", ".join(f.path for f in self.files)


_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class Lazy:
    """A tensor written by `write` without holding it beforehand: `make()` returns the array."""

    def __init__(self, shape, dtype, make):
        self.shape, self.dtype, self.make = tuple(shape), np.dtype(dtype), make

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))


def write(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Writes a safetensors file tensor by tensor (no second in-memory copy of the whole set).

    Values are arrays or `Lazy` tensors, made one at a time as they are written. The layout is the
    standard one (8-byte little-endian header length, JSON header padded with spaces to 8 bytes,
    then the data), so any safetensors reader opens it.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        value = tensors[key]
        if not isinstance(value, Lazy):
            value = tensors[key] = np.asarray(value)
        if value.dtype not in _CODES:
            raise TypeError(f"{path}: key {key!r}: dtype {value.dtype} cannot be stored")
        header[key] = {
            "dtype": _CODES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_file(path, "wb") as f:  # never a half-written file under the real name
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in sorted(tensors):
            value = tensors[key]
            arr = np.asarray(value.make() if isinstance(value, Lazy) else value, value.dtype)
            if arr.shape != tuple(value.shape):
                raise ValueError(
                    f"{path}: key {key!r}: made shape {arr.shape}, declared {value.shape}"
                )
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            del arr
