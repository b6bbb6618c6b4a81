"""The three checkpoint formats: detection, reading, and writing our own.

- "original": the release (`jinaai/jina-embeddings-v3`): `config.json` with `model_type`
  "xlm-roberta" and rotary positions, one `model.safetensors` (often bf16) whose LoRA-parametrized
  modules carry all task adapters stacked (`...parametrizations.weight.0.lora_A [T, r, in]`).
- "transformers": Transformers' `jina_embeddings_v3` folder (base weights only) plus one PEFT LoRA
  adapter folder per task (`retrieval_query/adapter_config.json`, `adapter_model.safetensors`).
- "jina_jax": written by `jina-jax convert`: the target tree under its own names.

Every reader returns a `Checkpoint` of plain nested trees (params, adapters) and the head tensors
under their checkpoint names; `load(place=...)` moves each parameter leaf to a device as soon as
it is complete.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil

import numpy as np
import numpy.typing as npt

from jina_jax.architecture import weight_shape
from jina_jax.config import RELEASE_TASKS, JinaConfig, canonical_task
from jina_jax.files import writes_folder
from jina_jax.tree import flatten, nest, set_path

from . import names
from .builders import AdapterBuilder, ParamBuilder
from .safetensors_io import CheckpointError, SafetensorsFile, TensorSource, parse_json
from .safetensors_io import write as save_file

FORMAT_KEY = "jina_jax_format"
FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
ADAPTERS_FILE = "adapters.safetensors"
HEADS_FILE = "heads.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "config_sentence_transformers.json",
)


@dataclasses.dataclass
class Checkpoint:
    config: JinaConfig
    params: dict  # the nested parameter tree (numpy arrays, or whatever `place` made)
    adapters: dict  # {task: adapter tree of np.float32 factors} (see jina_jax/lora.py)
    scales: dict  # {task: float}
    heads: dict  # {torch key: np.ndarray}: head tensors, untouched
    format: str
    folder: str | None  # where it was read from; None for a model made in memory
    tokenizer: object = None  # the folder's tokenizer.json as read by `load`, or None


# What a weight is stored as. No writer of these formats stores one as an integer or mixes the
# two 16-bit float types in one file, and such a tensor would load silently as float weights.
FLOAT_CODES = ("F32", "BF16", "F16", "F64")
HALF_CODES = ("BF16", "F16")


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    data = parse_json(raw, path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _config(folder: str, raw: dict, **changes) -> JinaConfig:
    """The model config from a parsed `config.json`; any bad field is an error naming the file."""
    try:
        return JinaConfig.from_dict({**raw, **changes})
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{os.path.join(folder, 'config.json')}: {e}") from None


def detect_format(folder: str) -> str:
    """ "original", "transformers" or "jina_jax", from `config.json`; anything else is an error."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json (not a checkpoint folder)")
    cfg = _read_json(path)
    if FORMAT_KEY in cfg:
        return "jina_jax"
    model_type = cfg.get("model_type")
    if model_type == "jina_embeddings_v3":
        return "transformers"
    if model_type in ("xlm-roberta", "bert") and (
        cfg.get("position_embedding_type") == "rotary" or "lora_adaptations" in cfg
    ):
        return "original"
    raise CheckpointError(
        f"{path}: unknown checkpoint format (model_type={model_type!r}); "
        "expected the jina-embeddings-v3 release ('xlm-roberta' with rotary "
        "positions), Transformers' 'jina_embeddings_v3', or a jina-jax folder"
    )


def read_tokenizer_file(path: str):
    """`tokenizers.Tokenizer.from_file(path)`; imported here, not at the top: `jina-jax --help`
    imports this module and must stay light."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def load(
    folder: str, dtype: npt.DTypeLike = np.float32, place=None, read_tokenizer=read_tokenizer_file
) -> Checkpoint:
    """Reads any supported folder. Base parameters come back in `dtype`; `place`, if given, is
    applied to each parameter leaf as soon as it is complete (see `ParamBuilder`). The folder's
    `tokenizer.json`, if any, is read first with `read_tokenizer(path)` (a file it refuses fails
    before any weight is read) and comes back as `Checkpoint.tokenizer`."""
    fmt = detect_format(folder)
    tokenizer = check_tokenizer(folder, read_tokenizer)
    reader = {
        "original": _load_original,
        "transformers": _load_transformers,
        "jina_jax": _load_native,
    }[fmt]
    return dataclasses.replace(reader(folder, np.dtype(dtype), place), tokenizer=tokenizer)


def check_tokenizer(folder: str, read_tokenizer=read_tokenizer_file):
    """`read_tokenizer(path)` of the folder's `tokenizer.json` (None when it has none); one that
    `tokenizers` cannot read (random bytes, JSON without a vocab, ...) is a CheckpointError."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        return read_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception
        raise CheckpointError(
            f"{path}: not a tokenizer that `tokenizers` can read ({str(e)[:300]})"
        ) from None


def _check_dtypes(files, fmt: str, allowed=FLOAT_CODES) -> None:
    """Every tensor of each file is stored as one of `allowed`, and a file holds at most one of
    the 16-bit float types; else a CheckpointError naming the first tensor at fault. Header
    arithmetic only."""
    for f in files:
        codes = {key: f.dtype_code(key) for key in f.keys()}
        for key, code in codes.items():
            if code not in allowed:
                raise CheckpointError(
                    f"{f.path}: key {key!r} is stored as {code}; a {fmt}-format "
                    f"checkpoint stores it as {' or '.join(allowed)}"
                )
        counts = collections.Counter(c for c in codes.values() if c in HALF_CODES)
        halves = sorted(counts, key=lambda c: (-counts[c], c))  # the file's own type first
        if len(halves) > 1:
            key = next(k for k, c in codes.items() if c == halves[-1])
            raise CheckpointError(
                f"{f.path}: key {key!r} is stored as {halves[-1]}, but the "
                f"file's other weights are {halves[0]} (a {fmt}-format "
                "checkpoint stores its weights in one 16-bit type)"
            )


# --- shared by the two PyTorch formats ------------------------------------------------------


def _scan_keys(src: TensorSource):
    """Splits keys into encoder targets and head tensors; an unknown key is an error."""
    targets, heads = {}, []
    for key in src.keys():
        if names.is_head_key(key):
            heads.append(key)
            continue
        target = names.parse(key)
        if target is None:
            raise CheckpointError(
                f"{src.file_of(key)}: key {key!r} is not part of "
                "jina-embeddings-v3 (the mapping does not know it)"
            )
        targets[key] = target
    has_pooler = any(t.module[0] == "pooler" for t in targets.values())
    return targets, heads, has_pooler


def _check_layer_count(folder: str, source: str, cfg, have: int) -> None:
    """A config that promises more layers than the weights (`source`) have is refused before
    the layer stacks ([num_hidden_layers, ...] each) are allocated."""
    if cfg.num_hidden_layers > have:
        raise CheckpointError(
            f"{os.path.join(folder, 'config.json')}: num_hidden_layers="
            f"{cfg.num_hidden_layers}, but {source} holds weights for "
            f"{have} layer(s)"
        )


def _layers_of(targets) -> int:
    """How many layers the keys of a PyTorch-format checkpoint cover (1 + the largest index)."""
    return max((t.layer + 1 for t in targets.values() if t.layer is not None), default=0)


def _read_base(src: TensorSource, cfg, targets, dtype, place) -> dict:
    builder = ParamBuilder(cfg, dtype, src.name, place)
    # Largest first, so tensors of one stacked leaf arrive together and it completes early.
    for key in sorted(
        (k for k, t in targets.items() if t.leaf in ("weight", "bias")),
        key=lambda k: -int(np.prod(src.shape(k))),
    ):
        builder.put(targets[key], src.read(key), key, src.file_of(key))
    return nest(builder.finish())


# --- the release ---------------------------------------------------------------------------


def _load_original(folder: str, dtype, place) -> Checkpoint:
    raw = _read_json(os.path.join(folder, "config.json"))
    src = TensorSource.open(folder)
    _check_dtypes(src.files, "release")
    targets, head_keys, has_pooler = _scan_keys(src)
    cfg = _config(folder, raw, add_pooling_layer=has_pooler)
    tasks = list(cfg.lora_adaptations)
    _check_layer_count(folder, src.name, cfg, _layers_of(targets))
    params = _read_base(src, cfg, targets, dtype, place)

    adapters = AdapterBuilder(cfg, src.name)
    for key, target in targets.items():
        file = src.file_of(key)
        if target.leaf.startswith("peft"):
            raise CheckpointError(f"{file}: PEFT key {key!r} inside a release-format checkpoint")
        if target.leaf not in ("lora_A", "lora_B"):
            continue
        stacked = src.read(key).astype(np.float32)
        if stacked.ndim != 3 or stacked.shape[0] != len(tasks):
            raise CheckpointError(
                f"{file}: key {key!r} has shape {list(stacked.shape)}; expected "
                f"[{len(tasks)} tasks (lora_adaptations), ...]"
            )
        rank_axis = {
            ("linear", "lora_A"): 1,
            ("linear", "lora_B"): 2,
            ("embed", "lora_A"): 2,
            ("embed", "lora_B"): 1,
        }[(target.kind, target.leaf)]
        if stacked.shape[rank_axis] != cfg.lora_rank:
            raise CheckpointError(
                f"{file}: key {key!r} has rank {stacked.shape[rank_axis]}, but "
                f"config.json says lora_rank={cfg.lora_rank}"
            )
        for i, task in enumerate(tasks):
            # Linear: A [r, in], B [out, r]  ->  a [in, r], b [r, out].
            # Embedding: A [V, r], B [r, H] are already a and b.
            value = stacked[i].T if target.kind == "linear" else stacked[i]
            factor = "a" if target.leaf == "lora_A" else "b"
            adapters.put(task, target, factor, value, key, file)
    scale = cfg.lora_alpha / cfg.lora_rank
    found = adapters.finish()
    found = {t: found[t] for t in tasks if t in found}  # in lora_adaptations order
    return Checkpoint(
        cfg,
        params,
        found,
        {t: scale for t in found},
        {k: src.read(k) for k in head_keys},
        "original",
        folder,
    )


# --- Transformers + PEFT ------------------------------------------------------------------

_REFUSED = {
    "use_dora": "DoRA",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "lora_bias": "LoRA bias",
    "alora_invocation_tokens": "aLoRA",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable tokens",
}


def _pattern_value(patterns: dict | None, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the key matches a suffix of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _task_display_name(folder_name: str, declared) -> str:
    for name in tuple(declared or ()) + RELEASE_TASKS:
        if canonical_task(name) == canonical_task(folder_name):
            return name
    return folder_name


def _adapter_folders(folder: str) -> list[str]:
    out = []
    for entry in sorted(os.listdir(folder)):
        sub = os.path.join(folder, entry)
        if not os.path.isdir(sub):
            continue
        has_config = os.path.isfile(os.path.join(sub, "adapter_config.json"))
        has_weights = any(
            os.path.isfile(os.path.join(sub, f))
            for f in ("adapter_model.safetensors", "adapter_model.bin")
        )
        if has_weights and not has_config:
            raise CheckpointError(f"{sub}: adapter weights without adapter_config.json")
        if has_config:
            out.append(sub)
    return out


def _read_peft_adapter(sub: str, task: str, cfg, adapters: AdapterBuilder) -> float:
    """Adds one PEFT LoRA folder to `adapters`; returns the task's scale."""
    conf_path = os.path.join(sub, "adapter_config.json")
    conf = _read_json(conf_path)
    if conf.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{conf_path}: peft_type {conf.get('peft_type')!r} is not LoRA")
    for field, what in _REFUSED.items():
        if conf.get(field):
            raise CheckpointError(
                f"{conf_path}: {what} ({field}={conf[field]!r}) is not plain "
                "LoRA and is not supported"
            )
    if conf.get("fan_in_fan_out"):
        raise CheckpointError(
            f"{conf_path}: fan_in_fan_out=True does not fit this model's Linear layers"
        )
    try:
        r, alpha = int(conf["r"]), float(conf["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{conf_path}: needs integer 'r' and numeric 'lora_alpha'") from None
    rslora = bool(conf.get("use_rslora"))
    scale_of = lambda rank, a: a / math.sqrt(rank) if rslora else a / rank
    task_scale = scale_of(r, alpha)

    weights = os.path.join(sub, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise CheckpointError(f"{sub}: no adapter_model.safetensors")
    f = SafetensorsFile(weights)
    _check_dtypes([f], "PEFT")
    for key in f.keys():
        target = names.parse(key)
        if target is None or not target.leaf.startswith("peft"):
            raise CheckpointError(
                f"{weights}: key {key!r} is not a LoRA factor of a jina-embeddings-v3 module"
            )
        value = f.read(key).astype(np.float32)
        module_name = names.strip_prefixes(key).rsplit(".lora_", 1)[0]
        if target.leaf in ("peft_A", "peft_emb_A"):
            # Linear A [r, in] -> a [in, r]; Embedding A [r, V] -> a [V, r]
            adapters.put(task, target, "a", value.T, key, weights)
            continue
        # Linear B [out, r]; Embedding B [H, r]: both -> b [r, out], with this module's own scale
        # relative to the task's (rank_pattern / alpha_pattern) folded in.
        rank = value.shape[1]
        mod_rank = _pattern_value(conf.get("rank_pattern"), module_name, r)
        if rank != mod_rank:
            raise CheckpointError(
                f"{weights}: key {key!r} has rank {rank}, but {conf_path} implies r={mod_rank}"
            )
        mod_alpha = _pattern_value(conf.get("alpha_pattern"), module_name, alpha)
        ratio = scale_of(rank, mod_alpha) / task_scale
        adapters.put(task, target, "b", value.T * ratio, key, weights)
    return task_scale


def read_peft_folder(sub: str, task: str, cfg) -> tuple[dict, float]:
    """(adapter tree of np.float32 factors, scale) of one PEFT LoRA folder, checked against
    `cfg` (a CheckpointError names the file and key that do not fit)."""
    adapters = AdapterBuilder(cfg, sub)
    scale = _read_peft_adapter(sub, task, cfg, adapters)
    return adapters.finish().get(task, {}), scale


def _load_transformers(folder: str, dtype, place) -> Checkpoint:
    raw = _read_json(os.path.join(folder, "config.json"))
    src = TensorSource.open(folder)
    _check_dtypes(src.files, "Transformers")
    targets, head_keys, has_pooler = _scan_keys(src)
    for key, target in targets.items():
        if target.leaf not in ("weight", "bias"):
            raise CheckpointError(
                f"{src.file_of(key)}: LoRA key {key!r} in the base weights of "
                "a Transformers-format checkpoint"
            )
    subs = _adapter_folders(folder)
    declared = raw.get("lora_adaptations")
    tasks = [_task_display_name(os.path.basename(s), declared) for s in subs]
    order = {canonical_task(t): i for i, t in enumerate(tuple(declared or ()) + RELEASE_TASKS)}
    ranked = sorted(zip(tasks, subs), key=lambda ts: (order.get(canonical_task(ts[0]), 99), ts[0]))

    fields = {"add_pooling_layer": has_pooler, "lora_adaptations": tuple(t for t, _ in ranked)}
    if not raw.get("task_instructions"):
        st_path = os.path.join(folder, "config_sentence_transformers.json")
        prompts = _read_json(st_path).get("prompts") if os.path.isfile(st_path) else None
        if prompts:
            fields["task_instructions"] = tuple(prompts.items())
    cfg = _config(folder, raw, **fields)
    _check_layer_count(folder, src.name, cfg, _layers_of(targets))
    params = _read_base(src, cfg, targets, dtype, place)

    adapters = AdapterBuilder(cfg, folder)
    scales = {task: _read_peft_adapter(sub, task, cfg, adapters) for task, sub in ranked}
    if ranked:
        first = _read_json(os.path.join(ranked[0][1], "adapter_config.json"))
        cfg = cfg.replace(lora_rank=int(first["r"]), lora_alpha=float(first["lora_alpha"]))
    found = adapters.finish()
    # A folder with an empty adapter still names a valid task (its delta is zero).
    found.update({task: {} for task in scales if task not in found})
    return Checkpoint(
        cfg, params, found, scales, {k: src.read(k) for k in head_keys}, "transformers", folder
    )


# --- our own format -----------------------------------------------------------------------


def _load_native(folder: str, dtype, place) -> Checkpoint:
    raw = _read_json(os.path.join(folder, "config.json"))
    if raw[FORMAT_KEY] != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}/config.json: {FORMAT_KEY}={raw[FORMAT_KEY]!r} is not "
            f"supported (this version reads {FORMAT_VERSION})"
        )
    cfg = _config(folder, raw)
    scales = {str(k): float(v) for k, v in raw.get("lora_scales", {}).items()}
    params_file = SafetensorsFile(os.path.join(folder, PARAMS_FILE))
    _check_dtypes([params_file], "jina-jax")
    _check_layer_count(
        folder,
        params_file.path,
        cfg,
        max(
            (
                params_file.shape(k)[0]
                for k in params_file.keys()
                if k.startswith("layers/") and params_file.shape(k)
            ),
            default=0,
        ),
    )
    builder = ParamBuilder(cfg, dtype, params_file.path, place)
    for key in params_file.keys():
        builder.put_path(tuple(key.split("/")), params_file.read(key), key, params_file.path)
    params = nest(builder.finish())

    adapters: dict = {task: {} for task in scales}
    path = os.path.join(folder, ADAPTERS_FILE)
    if os.path.isfile(path):
        f = SafetensorsFile(path)
        _check_dtypes([f], "jina-jax", allowed=("F32",))  # save_native writes float32 factors
        for key in f.keys():
            task, *module, factor = key.split("/")
            module = tuple(module)
            if task not in scales:
                raise CheckpointError(
                    f"{path}: key {key!r} is for task {task!r}, which "
                    "config.json's lora_scales does not list"
                )
            value = f.read(key).astype(np.float32)
            try:
                rows, cols = weight_shape(cfg, module)
            except KeyError:
                raise CheckpointError(
                    f"{path}: key {key!r} adapts no parameter of this config"
                ) from None
            lead = (cfg.num_hidden_layers,) if module[0] == "layers" else ()
            ok = (
                factor in ("a", "b")
                and value.shape[:-2] == lead
                and (value.shape[-2] == rows if factor == "a" else value.shape[-1] == cols)
            )
            if not ok:
                raise CheckpointError(
                    f"{path}: key {key!r} has shape {list(value.shape)}, which "
                    f"does not fit {'/'.join(module)} [{rows}, {cols}]"
                )
            set_path(adapters[task], module + (factor,), value)
    heads_path = os.path.join(folder, HEADS_FILE)
    heads = {}
    if os.path.isfile(heads_path):
        f = SafetensorsFile(heads_path)
        _check_dtypes([f], "jina-jax")
        heads = {k: f.read(k) for k in f.keys()}
    return Checkpoint(cfg, params, adapters, scales, heads, "jina_jax", folder)


@writes_folder
def save_native(folder: str, ckpt: Checkpoint, dtype=None):
    """Writes a jina-jax folder, whole or not at all (an existing one is replaced); `dtype`
    (default: as held) applies to the base parameters."""
    cast = (lambda x: np.asarray(x).astype(dtype)) if dtype is not None else np.asarray
    meta = {"format": "jina-jax"}
    save_file(
        {"/".join(p): cast(v) for p, v in flatten(ckpt.params).items()},
        os.path.join(folder, PARAMS_FILE),
        metadata=meta,
    )
    factors = {
        f"{task}/" + "/".join(p): np.asarray(v, np.float32)
        for task, tree in ckpt.adapters.items()
        for p, v in flatten(tree).items()
    }
    if factors:
        save_file(factors, os.path.join(folder, ADAPTERS_FILE), metadata=meta)
    if ckpt.heads:
        save_file(
            {k: np.asarray(v) for k, v in ckpt.heads.items()},
            os.path.join(folder, HEADS_FILE),
            metadata=meta,
        )
    config = {
        FORMAT_KEY: FORMAT_VERSION,
        **ckpt.config.to_dict(),
        "lora_scales": {t: float(s) for t, s in ckpt.scales.items()},
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    copy_tokenizer(ckpt.folder, folder)


def copy_tokenizer(source_folder: str | None, folder: str, skip=()) -> None:
    """The tokenizer files of `source_folder` (those it has, less `skip`) into `folder`."""
    if not source_folder or os.path.abspath(source_folder) == os.path.abspath(folder):
        return
    for name in TOKENIZER_FILES:
        path = os.path.join(source_folder, name)
        if os.path.isfile(path) and name not in skip:
            shutil.copyfile(path, os.path.join(folder, name))


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "copy_tokenizer",
    "detect_format",
    "load",
    "read_peft_folder",
    "save_native",
]
