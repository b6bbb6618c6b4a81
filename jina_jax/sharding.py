"""Where arrays go on a device mesh: batch rows over a data axis, weights replicated, split
tensor-parallel over a model axis, and/or split over the data axis to save memory.

    model.shard()                                  # 1-D mesh over every device: data parallel
    model.shard(shard_params=True)                 # ... each large weight split over it too
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    model.shard(mesh=mesh, model_axis="model")     # 2-way data x 4-way tensor parallel
    with jax.set_mesh(mesh):
        model.shard(model_axis="model")            # the same, from the mesh in context
    model.encode(texts, ...)                       # batches split over the data axis

Tensor-parallel specs come from the architecture table (`architecture.Module.parallel`), per
leaf of the parameter tree (layer leaves carry the leading [L] axis):

    qkv, fc1     kernel [L, I, O] -> P(None, None, model)   bias [L, O] -> P(None, model)
    out, fc2     kernel [L, I, O] -> P(None, model, None)   bias replicated
    word         embedding [V, H] -> P(None, model)
    norms, token types, pooler, adapters, heads: replicated

A dimension the axis does not divide stays whole. `shard_params=True` also splits the largest
remaining axis of each large leaf over the data axis (FSDP-like: XLA gathers it where used).
Batch row counts must be a multiple of the data axis's size; `encode` rounds its batches up.

Several processes (multi-host, after `jax.distributed.initialize()`): a mesh over `jax.devices()`
spans every process; the train step takes each process's own rows (`global_batch`), a multiple
of its share of the data axis. Embedding needs no cross-host mesh: each process shards over
`jax.local_devices()` and embeds its own texts (a forward on a mesh this process cannot fully
address is refused, `rows`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .architecture import BY_PATH, LEAVES

AXIS = "data"

# Leaves smaller than this stay replicated: splitting them saves little and costs a gather each.
MIN_SHARDED_SIZE = 1 << 16


def batch_mesh(devices=None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.array(devices), (AXIS,))


def put(x, sharding):
    """`jax.device_put`, except that a shape (`jax.ShapeDtypeStruct`, as `jax.eval_shape` gives)
    stays a shape, now with that sharding: what an ahead-of-time compile for devices this host
    does not have takes (`jina_jax.aot`)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.device_put(x, sharding)


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axes with automatic (GSPMD) axis types: our jitted functions let
    XLA choose intermediate layouts, which `jax.make_mesh`'s default explicit axes forbid."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _module_leaf(path: tuple) -> tuple | None:
    """(module path, leaf name) if `path` ends in a parameter leaf of the architecture table
    (an encoder parameter, wherever the tree nests it: a train state's optimizer moments too)."""
    # a dict key, a dataclass field's name, else None (a list index): any of them, hence `tuple`
    keys: tuple = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    for start in range(len(keys)):
        module, leaf = keys[start:-1], keys[-1]
        row = BY_PATH.get(module)
        if row is not None and leaf in LEAVES[row.kind]:
            return module, leaf
    return None


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and what each axis is for (see the module docstring)."""

    mesh: Mesh
    data_axis: str = AXIS
    model_axis: str | None = None
    shard_params: bool = False

    def __post_init__(self):
        names = self.mesh.axis_names
        for what, axis in (("data_axis", self.data_axis), ("model_axis", self.model_axis)):
            if axis is not None and axis not in names:
                raise ValueError(f"{what} {axis!r} is not an axis of the mesh {names}")
        if self.data_axis == self.model_axis:
            raise ValueError(f"data_axis and model_axis are both {self.data_axis!r}")
        object.__setattr__(self, "mesh", auto_mesh(self.mesh))

    @property
    def rows_multiple(self) -> int:
        """Batch rows must be a multiple of this: the data axis's size."""
        return int(self.mesh.shape[self.data_axis])

    @property
    def devices(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def local_rows_multiple(self) -> int:
        """This process's share of `rows_multiple` (all of it with one process): the rows a
        process feeds the train step must be a multiple of it."""
        return self.rows_multiple * len(self.mesh.local_devices) // self.devices

    def context(self):
        """`with layout.context():` runs JAX operations under this layout's own mesh: a caller's
        `jax.set_mesh` of explicit axes would otherwise clash with arrays placed on it."""
        return jax.set_mesh(self.mesh)

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def spec(self, path, shape) -> PartitionSpec:
        """The PartitionSpec of one leaf (a key path from `tree_flatten_with_path`)."""
        axes: list = [None] * len(shape)
        found = _module_leaf(path) if self.model_axis is not None else None
        if found is not None:
            module, leaf = found
            split = BY_PATH[module].parallel
            axis = (
                None  # a module no model axis splits
                if split is None
                else {
                    ("out", "kernel"): -1,
                    ("out", "bias"): -1,
                    ("in", "kernel"): -2,
                    ("dim", "embedding"): -1,
                }.get((split, leaf))
            )
            size = int(self.mesh.shape[self.model_axis])
            if axis is not None and len(shape) >= -axis and shape[axis] % size == 0:
                axes[axis] = self.model_axis
        if self.shard_params and int(np.prod(shape)) >= MIN_SHARDED_SIZE:
            size = self.rows_multiple
            for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
                if axes[axis] is None and shape[axis] % size == 0:
                    axes[axis] = self.data_axis
                    break
        while axes and axes[-1] is None:
            axes.pop()
        return PartitionSpec(*axes)

    def place(self, tree):
        """Every leaf of `tree` onto the mesh with its `spec` (parameters, adapters, train state)."""
        return jax.tree_util.tree_map_with_path(
            lambda p, x: put(x, self.sharding(self.spec(p, np.shape(x)))), tree
        )

    def replicate(self, tree):
        """Every leaf on every device of the mesh."""
        sharding = self.sharding(PartitionSpec())
        return jax.tree_util.tree_map(lambda x: put(x, sharding), tree)

    def rows(self, x):
        """Split axis 0 over the data axis (replicated over the others). The whole array is
        this process's: a mesh with other processes' devices is refused (their rows would have
        to be the same array, and the result could not be read back here)."""
        if x is None:
            return None
        local = len(self.mesh.local_devices)
        if local != self.devices and not isinstance(x, jax.ShapeDtypeStruct):
            raise ValueError(
                f"the mesh spans {self.devices} devices of {jax.process_count()} processes but "
                f"this process addresses {local}: embed per process over its own devices "
                "(model.shard(jax.local_devices())); only the train step takes a multi-host mesh"
            )
        n = self.rows_multiple
        if np.shape(x)[0] % n:
            raise ValueError(
                f"a batch of {np.shape(x)[0]} rows does not split over {n} devices "
                f"(the mesh's {self.data_axis!r} axis)"
            )
        return put(x, self.sharding(PartitionSpec(self.data_axis)))

    def global_batch(self, batch: Mapping) -> dict:
        """Rows split over the data axis. With several processes (multi-host, after
        `jax.distributed.initialize()`), each process passes its own rows (the same count in
        every process, a multiple of `local_rows_multiple`) and they are assembled into one
        global array in the order of the mesh's devices: process 0's rows first for a mesh over
        `jax.devices()`."""
        if jax.process_count() == 1:
            return {k: self.rows(v) for k, v in batch.items()}
        sharding = self.sharding(PartitionSpec(self.data_axis))
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()
        }


def mesh_layout(
    devices=None,
    *,
    mesh: Mesh | None = None,
    data_axis: str = AXIS,
    model_axis: str | None = None,
    shard_params: bool = False,
) -> Layout:
    """The layout for `model.shard(...)`: a given mesh, else the one of `jax.set_mesh` in
    context, else a 1-D data mesh over `devices` (default: every device)."""
    if mesh is not None and devices is not None:
        raise ValueError("give devices or a mesh, not both")
    if mesh is None and devices is None:
        current = jax.sharding.get_mesh()
        if not current.empty:
            mesh = current
    if mesh is None:
        if model_axis is not None:
            raise ValueError(
                f"model_axis {model_axis!r} needs a mesh with that axis (mesh=... or jax.set_mesh)"
            )
        mesh = batch_mesh(devices)
    return Layout(mesh, data_axis, model_axis, shard_params)


def on_mesh(layout: Layout | None):
    """`layout.context()`, or nothing to do without a layout."""
    return contextlib.nullcontext() if layout is None else layout.context()
