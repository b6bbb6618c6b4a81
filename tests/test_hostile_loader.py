"""Hostile checkpoints (issue 23, loader cases 8-11): each is refused with one line, a
`CheckpointError` naming the file and the key, before any large allocation.

The hostile files are built in a temp folder from a tiny valid release-format checkpoint
(`convert.random_checkpoint`), so these tests need no reference stack. "Before any large
allocation" is measured: the peak of Python's traced allocations (numpy's included) during the
refused load stays under the size of the folder's files plus a small constant.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc

import pytest

from convert import CheckpointError, load
from convert.export import save_transformers
from convert.formats import save_native
from convert.safetensors_io import SafetensorsFile
from jina_jax import JinaEmbeddingsV3


@pytest.fixture
def tiny(tiny_release):
    return tiny_release


@pytest.fixture
def ckpt(tmp_path, tiny_release):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_release, dst)
    return dst


# --- building hostile safetensors files ----------------------------------------------------

def read_raw(path):
    """(header dict, data bytes) of a safetensors file, with no checks."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path, header, data: bytes, raw_header: bytes | None = None):
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(body)) + body + data)


def by_size(header):
    """Tensor keys, largest first."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    return sorted(entries, key=lambda k: -(entries[k]["data_offsets"][1]
                                           - entries[k]["data_offsets"][0]))


def folder_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def refused(folder, *needles):
    """Loads `folder`, which must be refused with one line containing every needle; returns the
    message. The traced allocation peak of the attempt stays within the folder's size."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            load(str(folder))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert peak < 4 * folder_bytes(folder) + (8 << 20), (peak, message)
    return message


def header_refused(path, *needles):
    """The file's header alone is refused (no tensor is read: the refusal is arithmetic)."""
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


# --- case 8: nesting, huge, wrapping and negative shapes -----------------------------------

def test_safetensors_header_nested_100k_levels(ckpt):
    path = ckpt / "model.safetensors"
    header, data = read_raw(path)
    body = json.dumps(header).encode()
    deep = b'{"__metadata__": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}, " + body[1:]
    write_raw(path, None, data, raw_header=deep)
    refused(ckpt, "model.safetensors", "nested too deeply")


def test_config_json_nested_100k_levels(ckpt):
    path = ckpt / "config.json"
    text = path.read_text()
    path.write_text(text[:-1].rstrip().rstrip("}") + ', "x": ' + "[" * 100_000 + "]" * 100_000
                    + "}")
    refused(ckpt, "config.json", "nested too deeply")


def test_shape_too_large_for_any_integer(ckpt):
    path = ckpt / "model.safetensors"
    header, data = read_raw(path)
    key = by_size(header)[0]
    header[key]["shape"] = [10 ** 30]
    write_raw(path, header, data)
    refused(ckpt, "model.safetensors", repr(key), "do not hold")
    header_refused(path, repr(key))


def test_shape_whose_int64_product_wraps(ckpt):
    """[2**62 + n/4, 4] has 2**64 + n elements: an int64 product wraps to exactly n, the tensor's
    real size, so only exact arithmetic sees that it does not fit."""
    path = ckpt / "model.safetensors"
    header, data = read_raw(path)
    key = next(k for k in by_size(header) if header[k]["dtype"] == "BF16")
    begin, end = header[key]["data_offsets"]
    elements = (end - begin) // 2
    header[key]["shape"] = [2 ** 62 + elements // 4, 4]
    write_raw(path, header, data)
    refused(ckpt, "model.safetensors", repr(key), "do not hold")
    header_refused(path, repr(key))


def test_negative_dimensions(ckpt):
    path = ckpt / "model.safetensors"
    header, data = read_raw(path)
    key = by_size(header)[0]
    begin, end = header[key]["data_offsets"]
    elements = (end - begin) // 2
    header[key]["shape"] = [-2, -(elements // 2)]  # the product is the right size
    write_raw(path, header, data)
    refused(ckpt, "model.safetensors", repr(key), "negative dimension")
    header_refused(path, repr(key))


# --- case 9: a config that promises more layers than the weights hold ---------------------

@pytest.mark.parametrize("fmt", ["original", "transformers", "jina_jax"])
def test_num_hidden_layers_beyond_the_weights(ckpt, tmp_path, fmt):
    folder = ckpt
    if fmt != "original":
        c = load(str(ckpt))
        folder = tmp_path / fmt
        if fmt == "transformers":
            save_transformers(str(folder), c.config, c.params, c.adapters, c.scales, str(ckpt))
        else:
            save_native(str(folder), c)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["num_hidden_layers"] = 1_000_000
    path.write_text(json.dumps(config))
    refused(folder, "config.json", "num_hidden_layers=1000000", "2 layer(s)")


# --- case 10: a garbage tokenizer.json, checked before the weights ----------------------

@pytest.mark.parametrize("garbage", [bytes(range(256)) * 8, b'{"model": {"type": "Unigram"}}',
                                     b'{"version": "1.0"}'],
                         ids=["random-bytes", "no-vocab", "no-model"])
def test_garbage_tokenizer_is_refused_before_the_weights(ckpt, garbage):
    (ckpt / "tokenizer.json").write_bytes(garbage)
    # The weights are broken too: the tokenizer's error comes first, so it was checked first.
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refused(ckpt, "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a tokenizer"):
        JinaEmbeddingsV3.from_pretrained(str(ckpt))


def test_from_pretrained_keeps_the_checked_tokenizer(ckpt):
    model = JinaEmbeddingsV3.from_pretrained(str(ckpt))
    os.remove(ckpt / "tokenizer.json")  # read once, before the weights; not again on use
    assert model.tokenizer.encode("hello world").ids[0] == 0


# --- case 11: data_offsets as the format defines them; dtypes the format never uses ------

def _two_same_size(header):
    sizes = {}
    for key in by_size(header):
        b, e = header[key]["data_offsets"]
        sizes.setdefault((header[key]["dtype"], e - b), []).append(key)
    return next(keys for (_, n), keys in sizes.items() if len(keys) > 1 and n > 0)


def _repack(header, data, order):
    """Header and data with the tensors of `order` laid out contiguously in that order."""
    out, chunks, at = {}, [], 0
    for key in order:
        b, e = header[key]["data_offsets"]
        chunks.append(data[b:e])
        out[key] = dict(header[key], data_offsets=[at, at + e - b])
        at += e - b
    return out, b"".join(chunks)


@pytest.mark.parametrize("case", ["negative-begin", "end-before-begin", "shared-bytes",
                                  "overlap", "gap", "trailing-bytes"])
def test_data_offsets_are_validated(ckpt, case):
    path = ckpt / "model.safetensors"
    header, data = read_raw(path)
    header.pop("__metadata__", None)
    keys = by_size(header)
    if case == "negative-begin":  # the issue's [-2048, 0]: bytes of the JSON header as a weight
        key = keys[-1]
        b, e = header[key]["data_offsets"]
        header[key]["data_offsets"] = [-(e - b), 0]
        needles = [repr(key), "data_offsets"]
    elif case == "end-before-begin":
        key = keys[0]
        b, e = header[key]["data_offsets"]
        header[key]["data_offsets"] = [e, b]
        needles = [repr(key), "data_offsets"]
    elif case == "shared-bytes":  # two tensors on the very same bytes, nothing else wrong
        a, b = _two_same_size(header)[:2]
        header, data = _repack(header, data, [k for k in keys if k != b])
        header[b] = dict(header[a])
        needles = ["share bytes", repr(a), repr(b)]
    elif case == "overlap":  # one tensor starts inside the previous one
        header, data = _repack(header, data, keys)
        first, second = sorted(header, key=lambda k: header[k]["data_offsets"])[:2]
        b, e = header[second]["data_offsets"]
        header[second]["data_offsets"] = [b - 2, e - 2]
        needles = ["share bytes", repr(second)]
    elif case == "gap":
        header, data = _repack(header, data, keys)
        last = max(header, key=lambda k: header[k]["data_offsets"])
        b, e = header[last]["data_offsets"]
        header[last]["data_offsets"] = [b + 8, e + 8]
        data = data[:b] + b"\0" * 8 + data[b:]
        needles = ["belong to no tensor", repr(last)]
    else:
        data = data + b"\0" * 16
        needles = ["16 byte(s) after the last tensor"]
    write_raw(path, header, data)
    refused(ckpt, "model.safetensors", *needles)
    header_refused(path, *needles)


def test_duplicate_key_in_the_header(ckpt):
    path = ckpt / "model.safetensors"
    header, data = read_raw(path)
    key = by_size(header)[-1]
    body = json.dumps(header).encode()
    entry = json.dumps({key: header[key]})[1:-1].encode()
    write_raw(path, None, data, raw_header=body[:-1] + b", " + entry + b"}")
    refused(ckpt, "model.safetensors", repr(key), "appears twice")


@pytest.mark.parametrize("code", ["I16", "F16", "U8"])
def test_dtype_the_format_never_uses(ckpt, code):
    path = ckpt / "model.safetensors"
    header, data = read_raw(path)
    key = next(k for k in by_size(header) if header[k]["dtype"] == "BF16")
    header[key]["dtype"] = code
    if code == "U8":  # one byte a value: twice the elements in the same bytes
        header[key]["shape"] = header[key]["shape"][:-1] + [header[key]["shape"][-1] * 2]
    write_raw(path, header, data)
    refused(ckpt, "model.safetensors", repr(key), f"stored as {code}")


def test_native_adapters_are_float32_only(ckpt, tmp_path):
    native = tmp_path / "native"
    save_native(str(native), load(str(ckpt)))
    load(str(native))  # as written: fine
    path = native / "adapters.safetensors"
    header, data = read_raw(path)
    key = by_size(header)[0]
    header[key]["dtype"] = "I32"
    write_raw(path, header, data)
    refused(native, "adapters.safetensors", repr(key), "stored as I32")


def test_shard_index_cannot_lead_out_of_the_folder(ckpt, tmp_path):
    """A shard is a file of the checkpoint's folder, never `../elsewhere`."""
    shutil.move(ckpt / "model.safetensors", tmp_path / "outside.safetensors")
    header, _ = read_raw(tmp_path / "outside.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../outside.safetensors" for k in header if k != "__metadata__"}}))
    refused(ckpt, "model.safetensors.index.json", "not a file name in this folder")


def test_the_valid_tiny_checkpoint_loads(tiny):
    c = load(tiny)
    assert c.format == "original" and c.config.num_hidden_layers == 2
    assert c.tokenizer is not None


def test_cli_prints_one_line_and_exits_1(ckpt, tmp_path):
    path = ckpt / "model.safetensors"
    header, data = read_raw(path)
    key = by_size(header)[0]
    header[key]["shape"] = [10 ** 30]
    write_raw(path, header, data)
    done = subprocess.run([sys.executable, "-m", "convert", str(ckpt), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and repr(key) in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_embed_with_a_garbage_tokenizer_prints_one_line(ckpt, tmp_path):
    (ckpt / "tokenizer.json").write_bytes(b'{"model": {"type": "Unigram"}}')
    text = tmp_path / "in.txt"
    text.write_text("hello\n")
    done = subprocess.run([sys.executable, "-m", "jina_jax.cli", "embed", "--model", str(ckpt),
                           "--task", "none", "--input", str(text), "--output",
                           str(tmp_path / "out.npy")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ckpt / 'tokenizer.json'}: not a "
                                                   "tokenizer") and "vocab" in lines[0], lines
    assert not (tmp_path / "out.npy").exists()
