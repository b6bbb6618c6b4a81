"""Builders that fill the parameter tree and the adapter trees one source tensor at a time,
checking each against the config, and at the end refuse a tree with any hole: nothing loads
half-filled. Shapes come from the architecture table (`jina_jax.architecture`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from jina_jax.architecture import Path, param_shapes, release_key, weight_shape
from jina_jax.tree import set_path

from .names import Target
from .safetensors_io import CheckpointError

WHOLE = ("whole", None)  # in `filled`: the leaf came in one piece (our own format)


class ParamBuilder:
    """Fills the base parameter tree; `finish()` returns it or names what is missing."""

    def __init__(self, cfg, dtype, source: str, place=None):
        """`place(array)`, if given, receives each leaf as soon as it is complete (to move it to
        a device and drop the host copy, so host memory holds one leaf at a time, not the tree)."""
        self.cfg, self.dtype, self.source, self.place = cfg, np.dtype(dtype), source, place
        self.shapes = param_shapes(cfg)
        self.arrays: dict[Path, np.ndarray] = {}
        self.filled: dict[Path, set] = defaultdict(set)

    def put(self, target: Target, value: np.ndarray, key: str, file: str):
        """One source tensor into its place; `value` must be the caller's to give (a whole leaf
        already in the target's dtype and layout is kept, not copied)."""
        param = target.param
        if param is None or target.module + (param,) not in self.shapes:
            raise CheckpointError(
                f"{file}: key {key!r} has no place in a model with this config "
                f"(add_pooling_layer={self.cfg.add_pooling_layer})"
            )
        path: Path = target.module + (param,)
        full = self.shapes[path]
        layered = path[0] == "layers"
        if layered and (target.layer is None or not 0 <= target.layer < self.cfg.num_hidden_layers):
            raise CheckpointError(
                f"{file}: key {key!r} is for layer {target.layer}, but the "
                f"config has num_hidden_layers={self.cfg.num_hidden_layers}"
            )
        if target.kind == "linear" and target.leaf == "weight":
            value = value.T  # PyTorch [out, in] -> [in, out]
        want = full[1:] if layered else full
        index: tuple = (target.layer,) if layered else ()
        if target.slot is not None:  # one third of the fused qkv
            third = want[-1] // 3
            want = want[:-1] + (third,)
            index = index + (Ellipsis, slice(target.slot * third, (target.slot + 1) * third))
        if tuple(value.shape) != tuple(want):
            what = (
                "(transposed from [out, in]) "
                if target.kind == "linear" and target.leaf == "weight"
                else ""
            )
            raise CheckpointError(
                f"{file}: key {key!r} has shape {list(value.shape)} {what}but "
                f"the config implies {list(want)}"
            )
        layer = target.layer if layered else None
        done = self.filled[path]
        if (
            (layer, target.slot) in done
            or (layer, None) in done
            or (target.slot is None and any(m[0] == layer for m in done))
        ):
            raise CheckpointError(f"{file}: key {key!r} sets {'/'.join(path)} a second time")
        if path not in self.arrays and not index and _kept_as_is(value, self.dtype):
            # A whole leaf read in its dtype and layout (the word table, 1 GB at full size):
            # kept as read, not copied into a fresh array (a second pass over its memory).
            self.arrays[path] = value
        else:
            if path not in self.arrays:
                self.arrays[path] = np.empty(full, self.dtype)
            # Cast while copying into place: one pass, no temporary (5x faster than astype).
            np.copyto(self.arrays[path][index], value, casting="unsafe")
        done.add((layer, target.slot))
        if self.place is not None and not self._missing(path):
            self.arrays[path] = self.place(self.arrays[path])

    def put_path(self, path: Path, value: np.ndarray, key: str, file: str):
        """A leaf already in target layout (our own format)."""
        if path not in self.shapes:
            raise CheckpointError(f"{file}: key {key!r} is not a parameter of this config")
        if tuple(value.shape) != self.shapes[path]:
            raise CheckpointError(
                f"{file}: key {key!r} has shape {list(value.shape)} but the "
                f"config implies {list(self.shapes[path])}"
            )
        value = value.astype(self.dtype)
        self.arrays[path] = self.place(value) if self.place is not None else value
        self.filled[path] = {WHOLE}

    def _missing(self, path: Path) -> list[str]:
        layers = range(self.cfg.num_hidden_layers) if path[0] == "layers" else [None]
        done = self.filled.get(path, set())
        if WHOLE in done:
            return []
        missing = []
        for layer in layers:
            if (layer, None) in done or {(layer, 0), (layer, 1), (layer, 2)} <= done:
                continue
            missing.append(release_key(path[:-1], path[-1], layer))
        return missing

    def finish(self) -> dict[Path, np.ndarray]:
        missing = [k for path in self.shapes for k in self._missing(path)]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.source}: missing key(s) {missing[:5]}{more}")
        return self.arrays


def _kept_as_is(value: np.ndarray, dtype: np.dtype) -> bool:
    """Whether `value` can be a leaf itself: the dtype, C order, and its own memory."""
    return value.dtype == dtype and value.flags.c_contiguous and value.flags.owndata


class AdapterBuilder:
    """Collects LoRA factors per task and module; `finish()` gives one adapter tree per task.

    Factors arrive in the target layout (a [in, r], b [r, out]; tables a [V, r], b [r, H]) with
    any per-module scale correction already folded into b. Split q/k/v factors are fused into the
    qkv module as a = [a_q | a_k | a_v] and a block-diagonal b, which is exact.
    """

    def __init__(self, cfg, source: str):
        self.cfg, self.source = cfg, source
        # (task, module) -> layer -> slot -> {"a": ..., "b": ...}
        self.parts: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
        self.keys: dict = {}

    def put(self, task: str, target: Target, factor: str, value: np.ndarray, key: str, file: str):
        module = target.module
        try:
            rows, cols = weight_shape(self.cfg, module)
        except KeyError:
            raise CheckpointError(
                f"{file}: LoRA key {key!r} adapts {'/'.join(module)}, which "
                "this model does not have"
            ) from None
        if module[0] == "layers" and (
            target.layer is None or not 0 <= target.layer < self.cfg.num_hidden_layers
        ):
            raise CheckpointError(
                f"{file}: LoRA key {key!r} is for layer {target.layer}, but the "
                f"config has num_hidden_layers={self.cfg.num_hidden_layers}"
            )
        if target.slot is not None:
            cols //= 3
        value = np.asarray(value, np.float32)
        if (
            value.ndim != 2
            or (factor == "a" and value.shape[0] != rows)
            or (factor == "b" and value.shape[1] != cols)
        ):
            raise CheckpointError(
                f"{file}: LoRA key {key!r} has shape {list(value.shape)} "
                f"(as {factor} in [in, r] / [r, out] layout), which does not fit "
                f"{'/'.join(module)} of shape [{rows}, {cols}]"
            )
        slot = self.parts[(task, module)][target.layer][target.slot]
        if factor in slot:
            raise CheckpointError(
                f"{file}: LoRA key {key!r} sets task {task!r} {'/'.join(module)} a second time"
            )
        slot[factor] = value
        self.keys[(task, module, target.layer, target.slot, factor)] = (key, file)

    def _fuse(self, task, module, layer, slots) -> tuple[np.ndarray, np.ndarray]:
        for slot, fac in slots.items():
            for need in ("a", "b"):
                if need not in fac:
                    other = "b" if need == "a" else "a"
                    key, file = self.keys[(task, module, layer, slot, other)]
                    raise CheckpointError(
                        f"{file}: LoRA key {key!r} has no matching "
                        f"lora_{need.upper()} for task {task!r}"
                    )
            if fac["a"].shape[1] != fac["b"].shape[0]:
                key, file = self.keys[(task, module, layer, slot, "a")]
                raise CheckpointError(
                    f"{file}: LoRA factors of {key!r} disagree on the rank: "
                    f"{fac['a'].shape[1]} vs {fac['b'].shape[0]}"
                )
        if set(slots) == {None}:
            return slots[None]["a"], slots[None]["b"]
        rows, cols = weight_shape(self.cfg, module)
        third = cols // 3
        ranks = {s: slots[s]["a"].shape[1] for s in sorted(slots)}
        a = np.concatenate([slots[s]["a"] for s in sorted(slots)], axis=1)
        b = np.zeros((a.shape[1], cols), np.float32)
        start = 0
        for s, r in ranks.items():
            b[start : start + r, s * third : (s + 1) * third] = slots[s]["b"]
            start += r
        return a, b

    def finish(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for (task, module), layers in self.parts.items():
            fused = {
                layer: self._fuse(task, module, layer, slots) for layer, slots in layers.items()
            }
            if module[0] != "layers":
                a, b = fused[None]
            else:
                rank = max(a.shape[1] for a, _ in fused.values())
                rows, cols = weight_shape(self.cfg, module)
                n = self.cfg.num_hidden_layers
                # Layers the adapter skips, or with a smaller rank, get zeros: a @ b is unchanged.
                a = np.zeros((n, rows, rank), np.float32)
                b = np.zeros((n, rank, cols), np.float32)
                for layer, (fa, fb) in fused.items():
                    a[layer, :, : fa.shape[1]] = fa
                    b[layer, : fb.shape[0]] = fb
            set_path(out.setdefault(task, {}), module, {"a": a, "b": b})
        return out
