"""Faults tried on the real CLI in subprocesses (docs/reliability.md tabulates them): kill -9 mid-run,
SIGTERM / SIGINT, kill -9 during a save, a corrupt checkpoint, a NaN. Every interrupted run, resumed with the
same command, must end bit-identical (params, EMA, optimizer state, key, metrics steps) to one uninterrupted
run of the same length in another process, which also shows that two runs of one config agree bit for bit.

The subprocesses share the session's persistent compilation cache (tests/conftest.py), so only the first compiles.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import DIGITS, ROOT, TINY, checkpoint_state

from diffusion_jax.train.checkpoint import Checkpointer, CheckpointError
from diffusion_jax.train.faults import NonFiniteError, NonFiniteGuard
from diffusion_jax.train.metrics import read_metrics, truncate_metrics
from diffusion_jax.train.state import make_init_fn, make_optimizer

STEPS, CKPT_EVERY = 20, 5
_RUN = {"train.steps": STEPS, "train.ckpt_every": CKPT_EVERY, "train.keep_checkpoints": 3,
        "train.async_checkpointing": True}
FLAGS = [f"--config.{o}" for o in TINY if o.split("=")[0] not in _RUN] + [f"--config.{k}={v}" for k, v in _RUN.items()]


@pytest.fixture(scope="module")
def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def train_cmd(workdir, *extra, harness=None):
    entry = [harness] if harness else ["-m", "diffusion_jax"]
    return [sys.executable, *entry, "train", "--config", DIGITS + ":debug", "--workdir", str(workdir),
            "--no-progress", *FLAGS, *extra]


def run(cmd, env, expect=0):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def start_and_wait(workdir, env, rows, harness=None, marker=None):
    """Start a training process and return it once metrics.jsonl has `rows` rows (or `marker` exists)."""
    proc = subprocess.Popen(train_cmd(workdir, harness=harness), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit {proc.returncode}) before the fault: {proc.stderr.read()[-2000:]}")
        if marker and os.path.exists(marker):
            return proc
        if not marker and os.path.exists(path) and len(read_metrics(str(workdir))) >= rows:
            return proc
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out waiting for training to make progress")


def assert_bit_identical(workdir, reference):
    leaves, ref = checkpoint_state(workdir), checkpoint_state(reference)
    assert len(leaves) == len(ref) > 0
    for a, b in zip(leaves, ref):
        np.testing.assert_array_equal(a, b)   # exact: not allclose
    assert [r["step"] for r in read_metrics(str(workdir))] == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """One uninterrupted run of STEPS steps."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(train_cmd(workdir), env)
    assert Checkpointer(str(workdir)).all_steps() == [10, 15, 20]
    return workdir


def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path, env, reference):
    proc = start_and_wait(tmp_path, env, rows=12)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    latest = Checkpointer(str(tmp_path)).latest_step()
    assert latest is not None and latest < STEPS
    resumed = run(train_cmd(tmp_path), env)
    assert f"resuming from {os.path.join(tmp_path, 'checkpoints', str(latest))} (step {latest})" in resumed.stderr
    assert_bit_identical(tmp_path, reference)


def test_sampling_twice_with_one_seed_gives_identical_samples(tmp_path, reference, capsys):
    from diffusion_jax.cli.main import main

    grids = []
    for name in ("a", "b"):   # two calls of the CLI, each building and compiling its own sampler
        out = tmp_path / f"{name}.npz"
        code = main(["sample", "--workdir", str(reference), "--sampler", "ddpm", "--steps", "5", "--num", "4",
                     "--seed", "0", "--out", str(tmp_path / f"{name}.png"), "--npz", str(out)])
        assert code == 0, capsys.readouterr().err
        grids.append(np.load(out)["images"])
    np.testing.assert_array_equal(grids[0], grids[1])


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_current_step_and_exits_with_128_plus_signal(tmp_path, env, reference, sig, code):
    proc = start_and_wait(tmp_path, env, rows=7)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    step = Checkpointer(str(tmp_path)).latest_step()
    assert f"received {sig.name}: saved a checkpoint at step {step}" in stderr
    assert step == read_metrics(str(tmp_path))[-1]["step"]   # the step it was at, not the last periodic one
    if sig == signal.SIGTERM:
        run(train_cmd(tmp_path), env)
        assert_bit_identical(tmp_path, reference)


def test_kill_9_during_a_save_restores_the_previous_checkpoint(tmp_path, env, reference):
    marker = str(tmp_path / "hanging")
    hang_env = dict(env, DJ_HANG_AT_STEP="10", DJ_HANG_MARKER=marker)
    workdir = tmp_path / "run"
    proc = start_and_wait(workdir, hang_env, rows=0, harness=os.path.join(ROOT, "tests", "e2e", "_hang_in_save.py"),
                          marker=marker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = os.path.join(workdir, "checkpoints")
    assert glob.glob(os.path.join(ckpts, "10.orbax-checkpoint-tmp*")), os.listdir(ckpts)  # the unfinished save
    assert Checkpointer(str(workdir)).all_steps() == [5]
    resumed = run(train_cmd(workdir), env)
    assert f"resuming from {os.path.join(ckpts, '5')} (step 5)" in resumed.stderr
    assert_bit_identical(workdir, reference)


def test_a_corrupt_checkpoint_is_named_moved_aside_and_the_previous_one_used(tmp_path, env, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "20", "state", "**", "*"), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, "r+b") as f:   # truncate every file of the newest checkpoint to half its size
                f.truncate(os.path.getsize(path) // 2)
    resumed = run(train_cmd(workdir), env)
    bad, moved = os.path.join(workdir, "checkpoints", "20"), os.path.join(workdir, "checkpoints-corrupt", "20")
    assert f"checkpoint {bad} could not be restored" in resumed.stderr and f"moved to {moved}" in resumed.stderr
    assert "resumed from step 15" in resumed.stderr and os.path.isdir(moved)   # kept for inspection
    assert_bit_identical(workdir, reference)


def test_a_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, env, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    proc = run(train_cmd(workdir, "--config.train.steps=30", "--config.optim.learning_rate=1e30",
                         "--config.optim.warmup_steps=0"), env, expect=3)
    last_good = os.path.join(workdir, "checkpoints", "20")
    assert "non-finite loss=" in proc.stderr and "update of step 22" in proc.stderr, proc.stderr[-2000:]
    assert f"the last good checkpoint is {last_good}" in proc.stderr
    assert Checkpointer(str(workdir)).all_steps() == [10, 15, 20]
    for a, b in zip(checkpoint_state(workdir), checkpoint_state(reference)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------------
# In-process pieces
# ------------------------------------------------------------------------------------------------------
def test_skip_mode_leaves_the_state_unchanged_on_a_nan_batch(tiny_experiment):
    import dataclasses

    from diffusion_jax import parallel
    from diffusion_jax.process.discrete import make_schedule
    from diffusion_jax.train.state import StepOptions, create_train_state, make_train_step

    exp = tiny_experiment
    mesh = parallel.make_mesh(1)
    tx, lr = make_optimizer(dataclasses.replace(exp.optim, warmup_steps=0), 10)  # lr > 0 at the first update
    graphdef, state, shardings = create_train_state(exp.model, tx, jax.random.PRNGKey(0), mesh)
    opts = StepOptions(0.9, False, False, None, skip_nonfinite=True)
    step = make_train_step(graphdef, make_schedule("linear", 1000), exp.loss, tx, lr, opts, mesh, shardings)
    image = np.zeros((8, 8, 8, 1), np.float32)
    before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    state, metrics = step(state, {"image": image + np.nan})
    assert not np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    for a, b in zip(before, jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    state, metrics = step(state, {"image": image})
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 2
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(state.params)))


def test_nonfinite_guard_names_the_step_and_metric_and_caps_skips():
    guard = NonFiniteGuard("stop", lambda: "/w/checkpoints/20")
    guard.check(21, {"loss": 0.5, "grad_norm": 1.0})
    with pytest.raises(NonFiniteError, match=r"grad_norm=inf in the update of step 22.*checkpoints/20"):
        guard.check(22, {"loss": 0.5, "grad_norm": float("inf")})
    skip = NonFiniteGuard("skip", lambda: None, max_consecutive=3)
    with pytest.warns(RuntimeWarning, match="loss=nan in the update of step 5: update skipped"):
        skip.check(5, {"loss": float("nan"), "grad_norm": 1.0})
    skip.check(6, {"loss": 0.1, "grad_norm": 1.0})   # a good step resets the count
    with pytest.warns(RuntimeWarning):
        skip.check(7, {"loss": float("nan"), "grad_norm": 1.0})
        skip.check(8, {"loss": float("nan"), "grad_norm": 1.0})
    with pytest.raises(NonFiniteError, match="3 updates in a row skipped"):
        skip.check(9, {"loss": float("nan"), "grad_norm": 1.0})
    assert skip.skipped == 4
    with pytest.raises(ValueError, match="train.on_nonfinite='retry'"):
        NonFiniteGuard("retry", lambda: None)


def test_checkpoints_of_another_structure_are_refused_and_nothing_is_moved(tmp_path, trained_workdir, tiny_experiment):
    import dataclasses

    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    tx, _ = make_optimizer(dataclasses.replace(tiny_experiment.optim, grad_clip=0.0), 10)  # no clip state
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(make_init_fn(tiny_experiment.model, tx, jax.random.PRNGKey(0))))
    ckpt = Checkpointer(str(workdir), async_save=False)
    with pytest.raises(CheckpointError, match=r"(?s)checkpoints/3: .*checkpoints/2: .*optimizer settings changed"):
        ckpt.restore_latest(abstract)
    assert ckpt.all_steps() == [2, 3] and not os.path.exists(workdir / "checkpoints-corrupt")
    ckpt.close()


def test_metrics_survive_a_torn_last_line_and_resume_keeps_each_step_once(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')   # killed mid-write
    assert [r["step"] for r in read_metrics(str(tmp_path))] == list(range(1, 8))
    truncate_metrics(str(tmp_path), 5)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
