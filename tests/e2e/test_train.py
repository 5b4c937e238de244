"""Training end to end on a tiny U-Net: one run, multi-device agreement, checkpoints, config errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import DIGITS, TINY

from diffusion_jax import parallel
from diffusion_jax.config import load_experiment
from diffusion_jax.train.checkpoint import Checkpointer, load_trained
from diffusion_jax.train.metrics import read_metrics
from diffusion_jax.train.state import create_train_state, make_optimizer


def test_end_to_end_tiny_run(trained_workdir):
    rows = read_metrics(trained_workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and r["img_per_s"] > 0
    assert Checkpointer(trained_workdir).all_steps() == [2, 3]
    assert os.path.exists(os.path.join(trained_workdir, "samples", "step_00000003.png"))
    with open(os.path.join(trained_workdir, "config.json")) as f:
        assert json.load(f)["model"]["channels"] == 8


@pytest.mark.slow    # about a minute: a JAX process with eight devices compiling DP, FSDP and DiT steps
def test_eight_fake_devices_give_the_same_loss_update_and_samples():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = os.path.join(os.path.dirname(__file__), "_multidevice.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loss8"] == pytest.approx(out["loss1"], rel=1e-5, abs=1e-6)
    assert out["loss_fsdp"] == pytest.approx(out["loss1"], rel=1e-5, abs=1e-6)
    assert out["param_diff_dp"] < 1e-5 and out["param_diff_fsdp"] < 1e-5
    assert any("data" in s for s in out["fsdp_specs"])  # FSDP really sharded some parameters
    # DiT on the rectified flow: FSDP over 8 devices gives the 1-device step, with most of its weights split
    assert out["loss_dit_fsdp"] == pytest.approx(out["loss_dit1"], rel=1e-5, abs=1e-6)
    assert out["param_diff_dit_fsdp"] < 1e-5 and out["dit_sharded_fraction"] > 0.8
    assert "train.batch_size=12" in out["batch_error"] and "8" in out["batch_error"]
    assert out["sample_diff"] < 1e-6   # same seed, same samples on 1 and 8 devices (float32 rounding aside)
    assert out["prefix_diff"] < 1e-6   # and image i is the same whether 8 or 16 are drawn


def test_checkpoint_save_restore_is_identical(tmp_path, tiny_experiment):
    mesh = parallel.make_mesh(1)
    tx, _ = make_optimizer(tiny_experiment.optim, 10)
    _, state, _ = create_train_state(tiny_experiment.model, tx, jax.random.PRNGKey(3), mesh)
    ckpt = Checkpointer(str(tmp_path), async_save=True)
    ckpt.save(7, state, tiny_experiment.to_dict())
    ckpt.wait()
    _, template, _ = create_train_state(tiny_experiment.model, tx, jax.random.PRNGKey(4), mesh)
    restored = ckpt.restore(template)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ckpt.restore_config()["model"]["channels"] == 8
    ckpt.close()


def test_load_trained_gives_ema_params(trained_workdir):
    exp, graphdef, params, step = load_trained(trained_workdir)
    assert step == 3 and exp.model.channels == 8
    assert sum(x.size for x in jax.tree.leaves(params)) > 0


def test_resuming_a_workdir_with_another_model_is_refused(trained_workdir):
    from diffusion_jax.train.loop import train_and_evaluate

    exp = load_experiment(DIGITS + ":debug", TINY + ["model.channels=12", "model.num_groups=4"])[0]
    with pytest.raises(ValueError, match="model.channels"):
        train_and_evaluate(exp, trained_workdir, progress=False)
    assert Checkpointer(trained_workdir).all_steps() == [2, 3]  # nothing lost


def test_a_workdir_saved_before_new_config_keys_existed_still_resumes(tmp_path, tiny_experiment):
    from diffusion_jax.fileio import write_json
    from diffusion_jax.train.loop import frozen_changes

    old = tiny_experiment.to_dict()
    for section, key in (("schedule", "kind"), ("schedule", "sigma_data"), ("model", "skip_rescale"),
                         ("loss", "p_mean")):
        del old[section][key]   # keys added after the run was saved: they had their default then
    write_json(str(tmp_path / "config.json"), old)
    assert frozen_changes(str(tmp_path), tiny_experiment) == []
    old["model"]["channels"] = 12
    write_json(str(tmp_path / "config.json"), old)
    assert frozen_changes(str(tmp_path), tiny_experiment) == ["model.channels"]


@pytest.mark.parametrize("override,key", [
    ("train.steps=0", "train.steps"),
    ("data.image_size=10", "model.image_size"),
    ("train.batch_size=-4", "train.batch_size"),
    ("schedule.num_timesteps=0", "schedule.num_timesteps"),
    ("sample.steps=5000", "sample.steps"),
    ("optim.decay='linear'", "optim.decay"),
    ("sample.sampler='dpm2m'", "sample.sampler"),
    ("sample.spacing='log'", "sample.spacing"),
    ("model.channels=10", "model.channels"),
])
def test_bad_config_values_fail_before_compiling_and_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_experiment(DIGITS, [override])


def test_unknown_and_mistyped_override_keys():
    with pytest.raises(ValueError, match="unknown config key 'train.stpes'.*steps"):
        load_experiment(DIGITS, ["train.stpes=3"])
    with pytest.raises(ValueError, match="unknown config key 'trian.steps': no section 'trian'; did you mean 'train'"):
        load_experiment(DIGITS, ["trian.steps=3"])
    with pytest.raises(ValueError, match="train.steps.*expects int"):
        load_experiment(DIGITS, ["train.steps=abc"])
    exp, _ = load_experiment(DIGITS, ["train.steps=7", "model.channel_mult=(1,2)", "optim.learning_rate=1"])
    assert exp.train.steps == 7 and exp.model.channel_mult == (1, 2) and exp.optim.learning_rate == 1.0
