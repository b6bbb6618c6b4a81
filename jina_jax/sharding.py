"""Data parallelism over every visible device: a 1-D mesh over the batch, parameters replicated
(or, to save memory, split over the same devices and gathered by XLA where used).

    model.shard()                    # all devices of the default backend
    model.shard(shard_params=True)   # each large weight split over the devices too
    model.encode(texts, ...)         # batches split over the devices, results in input order

Batch row counts are rounded up to a multiple of the device count, so every device gets rows.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


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


def replicate(tree, mesh: Mesh):
    """Every leaf on every device of the mesh."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(lambda x: put(x, sharding), tree)


# Leaves smaller than this stay replicated: splitting them saves little and costs a gather each.
MIN_SHARDED_SIZE = 1 << 16


def param_spec(shape, n: int) -> PartitionSpec:
    """Split the largest axis that divides evenly over n devices; small leaves replicated."""
    if int(np.prod(shape)) < MIN_SHARDED_SIZE or not shape:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[axis] % n == 0:
            return PartitionSpec(*([None] * axis + [AXIS]))
    return PartitionSpec()


def place_params(tree, mesh: Mesh, shard: bool = False):
    """Parameters onto the mesh: replicated, or (shard=True) split leaf by leaf (`param_spec`)."""
    if not shard:
        return replicate(tree, mesh)
    n = mesh.devices.size
    return jax.tree_util.tree_map(
        lambda x: put(x, NamedSharding(mesh, param_spec(np.shape(x), n))), tree)


def shard_rows(x, mesh: Mesh):
    """Split axis 0 over the mesh; its size must be a multiple of the device count."""
    if x is None:
        return None
    n = mesh.devices.size
    if np.shape(x)[0] % n:
        raise ValueError(f"a batch of {np.shape(x)[0]} rows does not split over {n} devices")
    return put(x, NamedSharding(mesh, PartitionSpec(AXIS)))


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """Rows split over the mesh. With several processes (multi-host, after
    `jax.distributed.initialize()`), each process passes its own rows and they are assembled
    into one global array, process 0's rows first."""
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    if jax.process_count() == 1:
        return {k: shard_rows(v, mesh) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
