"""Device mesh and shardings: everything the library knows about parallelism lives here.

One mesh axis, "data". Batches are split along it (data parallel); parameters, optimizer state and EMA are
either replicated or, with FSDP, each array is split along its largest dimension divisible by the number of
devices (ZeRO-3 style; XLA inserts the all-gathers and reduce-scatters). No pmap: plain `jax.jit` with
`NamedSharding` in and out (see DESIGN.md).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, flag: str = "train.num_devices") -> jax.sharding.Mesh:
    """A 1-D mesh over the first `num_devices` devices (default or 0: all); errors name `flag`."""
    available = jax.device_count()
    n = available if num_devices in (None, 0) else int(num_devices)
    if not 1 <= n <= available:
        raise ValueError(f"{flag}={num_devices} but {available} device(s) are available")
    return jax.make_mesh((n,), (DATA_AXIS,), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, num_devices: int, min_size: int = 2 ** 10) -> P:
    """Split the largest axis divisible by the device count; small arrays stay replicated."""
    if num_devices == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_devices == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(mesh, abstract_state, fsdp: bool = False):
    """A pytree of NamedSharding matching `abstract_state` (arrays or ShapeDtypeStructs)."""
    n = mesh.shape[DATA_AXIS]

    def one(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, fsdp_spec(shape, n) if fsdp else P())

    return jax.tree.map(one, abstract_state)


def check_divisible(num: int, mesh, name: str, hint: str = "train.num_devices") -> None:
    """A batch split over the "data" axis must divide evenly; the error names the argument `name`."""
    n = mesh.shape[DATA_AXIS]
    if num % n:
        raise ValueError(f"{name}={num} is not divisible by the number of devices ({n}); "
                         f"use a multiple of {n} or set {hint}")


def shard_batch(batch: dict, mesh) -> dict:
    """Host numpy batch -> global jax arrays split along the batch axis (single process)."""
    sharding = batch_sharding(mesh)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
