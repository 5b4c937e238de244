"""host.reuse_host_memory: XLA:CPU's per-call scratch buffer is reused instead of page-faulted in on every call."""
import os
import subprocess
import sys

import pytest

from diffusion_jax.host import reuse_host_memory

# A jitted function with a 132 MB temporary (the cumsum), called 16 times; prints the minor page faults per call.
PROBE = """
import resource, sys
from diffusion_jax.host import reuse_host_memory
print(reuse_host_memory() if sys.argv[1] == "1" else False)
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.cumsum(x, axis=0) * x))
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes > 100 * 2 ** 20
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_per_call(apply: bool) -> tuple[bool, list[int]]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if apply else "0"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    return lines[0] == "True", [int(n) for n in lines[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning (Linux)")
def test_scratch_memory_is_page_faulted_in_every_call_by_default_and_reused_with_the_policy():
    temp_pages = 132 * 2 ** 20 // 4096
    def calls_without_faults(faults):   # calls that found their scratch memory already mapped
        return sum(n < temp_pages // 20 for n in faults)

    applied, default = _faults_per_call(False)
    assert not applied and calls_without_faults(default[1:]) == 0    # glibc mmaps and unmaps it on every call
    # With the policy the freed block stays in the heap. Until the freed blocks coalesce into one that fits the
    # aligned request, the heap still grows now and then, so count the calls that reused it rather than demand all.
    applied, reused = _faults_per_call(True)
    assert applied and calls_without_faults(reused) >= 6, reused


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("DIFFUSION_JAX_HOST_MALLOC", "0")
    assert reuse_host_memory() is False


def test_the_cli_sets_the_policy_before_jax_starts_its_backend():
    """Threads that already picked a malloc arena keep it: importing the CLI and building its parser must not start
    JAX's CPU backend (a module-level jnp array would), or `reuse_host_memory()` in `cli.main` changes nothing."""
    code = ("from diffusion_jax.cli.main import build_parser\nbuild_parser()\n"
            "from jax._src import xla_bridge\nprint(xla_bridge.backends_are_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"
