"""Shared fixtures: one tiny experiment, trained once per session, reused by the train / CLI tests.

The session shares one persistent JAX compilation cache (a fresh temporary folder unless
JAX_COMPILATION_CACHE_DIR is set), so the many CLI calls and subprocesses that build the same jitted
functions compile each one once.
"""
import atexit
import contextlib
import os
import shutil
import sys
import tempfile

import pytest

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="diffusion_jax_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if "jax" in sys.modules:  # imported by a plugin before this file: the environment came too late
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

DIGITS = os.path.join(ROOT, "configs", "digits.py")

# A U-Net small enough that compiling its train step and samplers takes seconds: one resolution level and no
# attention, which halves every compile of the trained model (the levels, resampling and attention are verified by
# tests/unit/test_unet_options.py, tests/parity/test_unet.py and the backbones test).
TINY = ["model.channels=8", "model.channel_mult=(1,)", "model.num_res_blocks=1", "model.attention_resolutions=()",
        "model.num_groups=4", "model.num_heads=1", "data.image_size=8", "train.batch_size=8",
        "train.steps=3", "train.log_every=1", "train.ckpt_every=2", "train.sample_num=4", "train.sample_steps=3",
        "train.async_checkpointing=False"]


def numpy_fill(abstract: dict, seed: int = 0) -> dict:
    """Random params for a pure dict of ShapeDtypeStructs, drawn with numpy (compiling the threefry initialisers
    on CPU costs more than a tiny model): kernels N(0, 1/fan_in), norm scales 1, everything else 0.01 N(0, 1)."""
    import math

    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.standard_normal(x.shape, np.float32) / math.sqrt(np.prod(x.shape[:-1])))
        if name == "scale":
            return jnp.ones(x.shape, jnp.float32)
        return jnp.asarray(0.01 * rng.standard_normal(x.shape, np.float32))

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="session")
def tiny_experiment():
    from diffusion_jax.config import load_experiment

    return load_experiment(DIGITS + ":debug", TINY)[0]


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, tiny_experiment):
    """A workdir after 3 training steps of the tiny model (checkpoints at steps 2 and 3)."""
    from diffusion_jax.train.loop import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    train_and_evaluate(tiny_experiment, workdir, progress=False)
    return workdir


@pytest.fixture(scope="session")
def metrics_cache(tmp_path_factory):
    """One cache for the metrics' classifiers and reference features across the session (each trains once)."""
    path = str(tmp_path_factory.mktemp("metrics_cache"))
    old = os.environ.get("DIFFUSION_JAX_CACHE")
    os.environ["DIFFUSION_JAX_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("DIFFUSION_JAX_CACHE", None)
    else:
        os.environ["DIFFUSION_JAX_CACHE"] = old


def random_params(config, seed: int = 0):
    """A U-Net of `config` as (graphdef, params) with random values everywhere (a fresh init zeroes the output layers),
    filled from numpy: on CPU, compiling the threefry initialisers costs far more than the model."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from diffusion_jax.models import UNet

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.RandomState(seed)

    def fill(path, var):
        shape = var.shape
        if path[-1] == "scale":
            value = 1.0 + 0.1 * rng.randn(*shape)
        elif path[-1] == "bias":
            value = 0.1 * rng.randn(*shape)
        else:
            value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
        return path, var.replace(jnp.asarray(value, jnp.float32))

    return graphdef, nnx.from_flat_state([fill(p, v) for p, v in nnx.to_flat_state(abstract)])


def checkpoint_state(workdir, step=None) -> list:
    """The whole TrainState (params, EMA, optimizer state, key) of a checkpoint (default: the latest), as numpy
    leaves: what "bit-identical" compares."""
    import jax
    import numpy as np

    from diffusion_jax.config import Experiment, load_workdir_config
    from diffusion_jax.train.checkpoint import Checkpointer
    from diffusion_jax.train.state import make_init_fn, make_optimizer

    exp = Experiment.from_config(load_workdir_config(str(workdir)))
    tx, _ = make_optimizer(exp.optim, exp.train.steps)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(make_init_fn(exp.model, tx, jax.random.PRNGKey(0))))
    ckpt = Checkpointer(str(workdir), async_save=False)
    try:
        return [np.asarray(x) for x in jax.tree.leaves(ckpt.restore(abstract, step))]
    finally:
        ckpt.close()


@contextlib.contextmanager
def hold_workdir_lock(workdir: str, command: str = "train"):
    """Another process holding WORKDIR's lock (fileio.WorkdirLock) until the block ends, when it is killed (-9);
    yields its Popen (its PID is the holder's)."""
    import subprocess

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from diffusion_jax.fileio import WorkdirLock; "
         "WorkdirLock(sys.argv[1], sys.argv[2]).__enter__(); print('held', flush=True); time.sleep(300)",
         workdir, command], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
