"""Shared fixtures: one tiny experiment, trained once per session, reused by the train / CLI tests."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

DIGITS = os.path.join(ROOT, "configs", "digits.py")

# A U-Net small enough that compiling its train step takes seconds.
TINY = ["model.channels=8", "model.channel_mult=(1, 2)", "model.num_res_blocks=1", "model.attention_resolutions=(8,)",
        "model.num_groups=4", "model.num_heads=1", "data.image_size=8", "train.batch_size=8",
        "train.steps=3", "train.log_every=1", "train.ckpt_every=2", "train.sample_num=4", "train.sample_steps=3",
        "train.async_checkpointing=False"]


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
