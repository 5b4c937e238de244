"""Checkpoint integrity (train/manifest.py, train/checkpoint.py): every finished save gets a manifest of its files'
SHA-256; one flipped byte in ANY file of a checkpoint is caught before it is restored, naming the file; readers fall
back to the newest good checkpoint with a warning (nothing moved), training moves the bad one aside; a checkpoint
from before manifests restores unverified; and the workdir lock refuses a second writer and takes over a dead one's."""
import json
import os
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hold_workdir_lock

from diffusion_jax.fileio import LOCK_FILE, WorkdirLock, WorkdirLocked
from diffusion_jax.train.checkpoint import CheckpointCorrupt, CheckpointError, Checkpointer
from diffusion_jax.train.manifest import MANIFEST, check_workdir


def _state(v: float):
    return {"w": jnp.arange(2000.0) * v, "b": jnp.full((3, 4), v)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with checkpoints at steps 1 and 2 (asynchronous saves, as training makes them)."""
    workdir = str(tmp_path_factory.mktemp("ckpt"))
    ckpt = Checkpointer(workdir, async_save=True)
    ckpt.save(1, _state(1.0), {"step": 1})
    ckpt.save(2, _state(2.0), {"step": 2})
    ckpt.close()
    return workdir


def _files(step_dir):
    with open(os.path.join(step_dir, MANIFEST)) as f:
        return sorted(json.load(f)["files"])


def _flip(path, where=0.5):
    data = bytearray(open(path, "rb").read())
    i = min(int(len(data) * where), len(data) - 1)
    data[i] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_every_finished_save_has_a_manifest_of_its_files(saved):
    for step in (1, 2):
        step_dir = os.path.join(saved, "checkpoints", str(step))
        files = _files(step_dir)
        on_disk = sorted(os.path.relpath(os.path.join(r, f), step_dir) for r, _, fs in os.walk(step_dir) for f in fs
                         if f != MANIFEST)
        assert files == on_disk and any(f.startswith("state") for f in files)
    ckpt = Checkpointer(saved, async_save=False)
    try:
        np.testing.assert_array_equal(ckpt.restore(_state(0.0), 2)["w"], _state(2.0)["w"])
    finally:
        ckpt.close()
    assert [(r["step"], r["status"]) for r in check_workdir(saved)] == [(2, "ok"), (1, "ok")]


def test_one_flipped_byte_in_any_file_is_caught_and_readers_fall_back(saved, tmp_path):
    files = _files(os.path.join(saved, "checkpoints", "2"))
    for k, name in enumerate(files):
        copy = str(tmp_path / f"w{k}")
        shutil.copytree(saved, copy)
        _flip(os.path.join(copy, "checkpoints", "2", name))
        ckpt = Checkpointer(copy, async_save=False)
        try:
            with pytest.raises(CheckpointCorrupt, match=f"{name}: content changed"):
                ckpt.restore(_state(0.0), 2)
            with pytest.warns(RuntimeWarning, match=r"checkpoints/2 could not be restored .*using step 1"):
                state, step = ckpt.restore_newest_good(_state(0.0))
        finally:
            ckpt.close()
        assert step == 1 and float(state["b"][0, 0]) == 1.0
        assert os.path.isdir(os.path.join(copy, "checkpoints", "2"))   # a reader moves nothing
        assert [r["status"] for r in check_workdir(copy)] == ["corrupt", "ok"]


def test_training_moves_a_corrupt_checkpoint_aside_and_none_good_is_an_error(saved, tmp_path):
    copy = str(tmp_path / "w")
    shutil.copytree(saved, copy)
    _flip(os.path.join(copy, "checkpoints", "2", _files(os.path.join(copy, "checkpoints", "2"))[-1]))
    ckpt = Checkpointer(copy, async_save=False)
    with pytest.warns(RuntimeWarning, match="moved to"):
        _, step = ckpt.restore_latest(_state(0.0))
    ckpt.close()
    assert step == 1 and os.listdir(os.path.join(copy, "checkpoints-corrupt")) == ["2"]
    _flip(os.path.join(copy, "checkpoints", "1", _files(os.path.join(copy, "checkpoints", "1"))[0]))
    ckpt = Checkpointer(copy, async_save=False)
    try:
        with pytest.raises(CheckpointError, match=r"no checkpoint .* could be restored .*checkpoints/1"):
            ckpt.restore_newest_good(_state(0.0))
        with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
            ckpt.restore_newest_good(_state(0.0), 7)
    finally:
        ckpt.close()


def test_a_checkpoint_without_a_manifest_restores_unverified(saved, tmp_path):
    copy = str(tmp_path / "old")
    shutil.copytree(saved, copy)
    os.remove(os.path.join(copy, "checkpoints", "2", MANIFEST))
    ckpt = Checkpointer(copy, async_save=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert float(ckpt.restore(_state(0.0), 2)["b"][0, 0]) == 2.0
    finally:
        ckpt.close()
    assert [r["status"] for r in check_workdir(copy)] == ["unverified", "ok"]


def test_the_workdir_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    workdir = str(tmp_path / "run")
    with hold_workdir_lock(workdir) as holder:
        with pytest.raises(WorkdirLocked, match=rf"in use by PID {holder.pid} on .* \(train\)"):
            with WorkdirLock(workdir, "train"):
                pass
    with pytest.warns(RuntimeWarning, match=rf"took over the lock .* left by PID {holder.pid}"):
        with WorkdirLock(workdir, "sample"):
            with WorkdirLock(workdir, "nested"):   # re-entrant within a process
                assert json.load(open(os.path.join(workdir, LOCK_FILE)))["pid"] == os.getpid()
    assert open(os.path.join(workdir, LOCK_FILE)).read() == ""   # released cleanly: nothing to take over
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with WorkdirLock(workdir, "train"):
            pass
