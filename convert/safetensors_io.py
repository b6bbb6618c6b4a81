"""Reading safetensors one tensor at a time, with errors that name the file and the key.

The reader parses the header itself and reads each tensor with one positioned read into a fresh
array, so loading holds at most one source tensor at a time and no file pages stay mapped (a
memory-mapped 1 GB file touched end to end would otherwise count fully towards peak RSS). bf16
comes back as `ml_dtypes.bfloat16`. Writing goes through the `safetensors` package.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jina_jax.files import atomic_file

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where known, the key."""


class SafetensorsFile:
    """The header of one safetensors file, and positioned reads of its tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file not found")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (shorter than its "
                                      "8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path}: corrupt safetensors header (header length "
                                      f"{n} for a file of {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = {}
        for key, entry in header.items():
            try:
                dtype = _DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for key {key!r}: "
                                      f"{entry!r}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise CheckpointError(f"{self.path}: key {key!r}: {end - begin} bytes do not hold "
                                      f"{entry['dtype']} {list(shape)}")
            if self._data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated file: key {key!r} ends at byte "
                                      f"{self._data_start + end}, the file has {size} bytes")
            self._entries[key] = (dtype, shape, begin)

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
        dtype, shape, begin = self._entries[key]
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
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
                    raise CheckpointError(f"key {key!r} is in both {self._where[key].path} and "
                                          f"{f.path}")
                self._where[key] = f

    @classmethod
    def open(cls, folder: str, name: str = "model.safetensors") -> "TensorSource":
        single = os.path.join(folder, name)
        index = single + ".index.json"
        if os.path.isfile(single):
            return cls([SafetensorsFile(single)])
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
            return cls([SafetensorsFile(os.path.join(folder, s)) for s in shards])
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
        header[key] = {"dtype": _CODES[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + value.nbytes]}
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
                raise ValueError(f"{path}: key {key!r}: made shape {arr.shape}, declared {value.shape}")
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            del arr
