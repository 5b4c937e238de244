"""Device mesh and shardings: everything the library knows about parallelism lives here.

One mesh axis, "data". Batches are split along it (data parallel); parameters, optimizer state and EMA are
either replicated or, with FSDP, each array is split along its largest dimension divisible by the number of
devices (ZeRO-3 style; XLA inserts the all-gathers and reduce-scatters). No pmap: plain `jax.jit` with
`NamedSharding` in and out (see DESIGN.md).

Multi-host (several processes, one per host or per GPU): `initialize_distributed` joins the run before any
other JAX call; the mesh then spans every process's devices. Every process computes the same global batch
from (seed, step) and `shard_batch` keeps the rows of its own devices; `to_host` gathers a sharded result
(a sample grid) on every process; only `is_main_process()` writes files other than checkpoints, which orbax
writes from all processes together. On CPU the collectives go through gloo (tested with two processes on
127.0.0.1, tests/e2e/test_multihost.py).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process run: `jax.distributed.initialize`, with gloo collectives on CPU.

    coordinator "HOST:PORT" of process 0, with num_processes and process_id; all None lets JAX detect the
    cluster (SLURM, Open MPI, TPU pod slices, Kubernetes). Must run before any other JAX computation.
    """
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together (or give none of them to "
                         f"let JAX detect the cluster); got {coordinator!r}, {num_processes!r}, {process_id!r}")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id={process_id} must be in [0, --num-processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def is_main_process() -> bool:
    """Process 0 writes metrics, configs and images (every process writes its part of a checkpoint)."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """A global (possibly sharded across processes) array as one numpy array on every process. A collective
    when the array spans several processes: every process must call it."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str) -> None:
    """Barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


def step_compiler_options(mesh) -> dict | None:
    """XLA options for the jitted train steps: on CPU, LLVM at -O1 (`xla_backend_optimization_level=1`).

    A U-Net step's time is in the library kernels XLA:CPU calls for convolutions and matmuls (YNNPACK), not in
    the loops LLVM generates, so -O1 costs no step time and compiles faster: the CIFAR-10 DDPM step compiles in
    22.6 s instead of 28.3 s with the same 6.4 s step (`python benchmarks/train_step.py`, docs/benchmarks.md).
    Other platforms keep XLA's defaults (None).
    """
    if mesh.devices.flat[0].platform == "cpu":
        return {"xla_backend_optimization_level": 1}
    return None


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
    """Host numpy batch -> global jax arrays split along the batch axis. With several processes, each passes
    the same global batch and keeps the rows of its own devices."""
    sharding = batch_sharding(mesh)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
