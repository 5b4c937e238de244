"""Host memory policy for XLA:CPU: keep each step's scratch memory mapped from one call to the next.

Why: XLA:CPU allocates an executable's temporary buffer afresh on every call (`posix_memalign` from a worker
thread) and frees it at the end: 114 MB for the digits train step, 1.3 GB for the CIFAR-10 one. glibc serves a
request that large from a new `mmap` (worker threads' arenas cannot grow past 64 MB) and unmaps it on free, so
every step page-faults its whole scratch memory back in and the kernel zeroes it: 28k faults per digits step and
340k (1.3 GB) per CIFAR-10 step, 12-20% of the process's CPU time spent in the kernel (docs/benchmarks.md). With
one malloc arena, no `mmap` for large blocks and no trimming of the heap, the freed buffer stays in the heap and
the next call reuses it without a fault.

The cost: the process keeps its peak heap (freed memory is reused, not returned to the OS), which is what a
training or sampling process wants anyway. It must run before JAX starts its CPU backend (before the first
array or computation): threads that have already picked an arena keep it. The CLI, `diffusion_jax.bench` and the
benchmark scripts call it first thing; DIFFUSION_JAX_HOST_MALLOC=0 leaves glibc's defaults alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def reuse_host_memory() -> bool:
    """One glibc malloc arena, no mmap-backed blocks, no heap trimming. Returns whether it was applied: False off
    Linux / glibc, or with DIFFUSION_JAX_HOST_MALLOC=0."""
    if os.environ.get("DIFFUSION_JAX_HOST_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version   # glibc only (musl has no arenas to configure)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)
