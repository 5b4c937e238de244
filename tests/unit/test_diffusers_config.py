"""sampler_from_diffusers / to_diffusers_config without diffusers: refusals name the key, every key of every class is
read, the config file forms, dynamic thresholding, the NFE search (the numbers themselves: tests/parity/
test_scheduler_configs.py against diffusers)."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.samplers.diffusers_export import to_diffusers_config
from diffusion_jax.samplers.diffusers_import import (
    count_nfe_diffusers,
    load_scheduler_config,
    sampler_from_diffusers,
    steps_for_nfe_diffusers,
)
from diffusion_jax.samplers.diffusers_schedulers import REFUSED, SCHEDULERS, Keys
from diffusion_jax.samplers.grid import discrete_grid
from diffusion_jax.samplers.wrapper import Threshold

LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_key_of_every_class_is_read_or_neutral(name):
    entry = SCHEDULERS[name]
    c = Keys(name, {}, entry.defaults)
    entry.build(c, 10)
    assert set(entry.defaults) == c.read | set(entry.neutral), set(entry.defaults) - c.read - set(entry.neutral)


@pytest.mark.parametrize("cfg, steps, match", [
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, 10, "needs the pipeline's mu"),
    ({"_class_name": "TCDScheduler"}, 4, "trajectory consistency distillation"),
    ({"_class_name": "LCMScheduler"}, 51, "original_inference_steps=50 caps LCMScheduler's inference steps"),
    ({"_class_name": "LCMScheduler", "original_inference_steps": 1001}, 10,
     "original_inference_steps=1001 must be at most num_train_timesteps=1000"),
    ({"_class_name": "NoSuchScheduler"}, 10, "unknown; supported"),
    ({}, 10, "_class_name=None is unknown"),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "sometimes"}, 10, "timestep_spacing='sometimes'"),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "linspace"}, 10, "is not the next timestep"),
    ({"_class_name": "DDIMScheduler", "steps_offset": 1.5}, 10, "steps_offset=1.5 must be an int"),
    ({"_class_name": "DDIMScheduler", "set_alpha_to_one": "yes"}, 10, "set_alpha_to_one='yes' must be true"),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "exp"}, 10, "beta_schedule='exp' is not supported"),
    ({"_class_name": "DDIMScheduler", "trained_betas": [0.1] * 10}, 10, "trained_betas must be 1000 numbers"),
    ({"_class_name": "DDIMScheduler"}, 1001, "exceeds num_train_timesteps=1000"),
    ({"_class_name": "DDIMScheduler"}, 0, "positive int"),
    ({"_class_name": "DDPMScheduler", "variance_type": "learned"}, 10, "variance_type='learned'"),
    ({"_class_name": "DDPMScheduler", "variance_type": "fixed_large", "timestep_spacing": "trailing"}, 10,
     "adds beta noise on its last step"),
    ({"_class_name": "PNDMScheduler", "prediction_type": "v_prediction"}, 10, "combines raw v outputs"),
    ({"_class_name": "PNDMScheduler"}, 3, "needs at least 4 steps"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "use_beta_sigmas": True}, 10,
     "only one of"),
    ({"_class_name": "EulerDiscreteScheduler", "timestep_type": "fractional"}, 10, "timestep_type"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True}, 10, "use_flow_sigmas=True"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}, 10, "solver_order=4 must be 1, 2 or 3"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, 10,
     "sign error"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver"}, 10, "algorithm_type"),
    ({"_class_name": "DPMSolverMultistepScheduler", "variance_type": "fixed"}, 10, "variance_type='fixed'"),
    ({"_class_name": "UniPCMultistepScheduler", "solver_p": {"a": 1}}, 10, "solver_p"),
    ({"_class_name": "UniPCMultistepScheduler", "shift_terminal": 0.1}, 10, "shift_terminal=0.1"),
    ({"_class_name": "DEISMultistepScheduler", "solver_type": "bh1"}, 10, "solver_type='bh1'"),
])
def test_refusals_name_the_key(cfg, steps, match):
    with pytest.raises(ValueError, match=match):
        sampler_from_diffusers(cfg, steps)


def test_every_refused_class_says_why():
    for name, why in REFUSED.items():
        with pytest.raises(ValueError, match=f"{name}.*not supported: it "):
            sampler_from_diffusers({"_class_name": name}, 10)
        assert len(why) > 20


def test_keys_of_other_classes_are_listed_and_logged(caplog):
    cfg = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.42.1", "clip_sample": False,
           "set_alpha_to_one": False, "skip_prk_steps": True}
    with caplog.at_level(logging.WARNING):
        imp = sampler_from_diffusers(cfg, 10)
    assert imp.ignored == ("clip_sample", "set_alpha_to_one", "skip_prk_steps")
    assert "not options of EulerDiscreteScheduler" in caplog.text and "_diffusers_version" not in caplog.text
    assert "timestep_spacing" in imp.honoured and imp.sampler == "euler"
    # diffusers' in-memory configs list the keys that took their defaults: the new class's defaults apply to them
    moved = sampler_from_diffusers({**cfg, "timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]},
                                   10)
    assert np.array_equal(np.asarray(moved.grid.t), np.asarray(imp.grid.t))       # Euler's default: linspace


def test_config_files(tmp_path):
    cfg = {"_class_name": "DDIMScheduler", **LINEAR}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    for source in (tmp_path, tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json"):
        assert load_scheduler_config(source) == cfg
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_scheduler_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_scheduler_config(tmp_path / "list.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        load_scheduler_config(tmp_path / "empty")


def test_ddim_config_is_our_ddim_grid():
    """DDIM with leading spacing, set_alpha_to_one, steps_offset 0: our run_sampler grid; with set_alpha_to_one
    false the last level is abar_0 (Stable Diffusion 1.x), with steps_offset 1 every timestep moves up by one."""
    sched = make_schedule("linear", 1000)
    imp = sampler_from_diffusers({"_class_name": "DDIMScheduler", "clip_sample": False}, 20)
    ours = discrete_grid(sched, 20, "leading")
    for a, b in zip((imp.grid.t, imp.grid.alpha, imp.grid.sigma), (ours.t, ours.alpha, ours.sigma)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    sd = sampler_from_diffusers({"_class_name": "DDIMScheduler", "set_alpha_to_one": False, "steps_offset": 1}, 20)
    np.testing.assert_array_equal(np.asarray(sd.grid.t[:-1]), np.asarray(ours.t[:-1]) + 1)
    assert np.isclose(float(sd.grid.alpha[-1]), np.sqrt(1 - 1e-4), rtol=1e-6)
    assert sd.plan.clip_denoised == 1.0 and not sd.plan.rederive_eps        # DDIM's defaults


def test_euler_x_T_scale_follows_init_noise_sigma():
    """Euler family: x_T = init_noise_sigma z in x / alpha coordinates, i.e. alpha_0 s_max z (linspace, trailing)
    or alpha_0 sqrt(s_max^2 + 1) z = z (leading)."""
    lin = sampler_from_diffusers({"_class_name": "EulerDiscreteScheduler", **LINEAR}, 10)
    lead = sampler_from_diffusers({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading"}, 10)
    assert np.isclose(lin.plan.noise_scale, float(lin.grid.sigma[0]), rtol=1e-6)
    assert np.isclose(lead.plan.noise_scale, 1.0, rtol=1e-6)
    assert lin.plan.out_scale == 1.0


def test_threshold_is_imagen_dynamic_thresholding():
    x = jnp.asarray(np.random.default_rng(0).normal(0, 1.5, (3, 4, 5, 2)), jnp.float32)
    th = Threshold(0.9, 1.3)
    s = np.clip(np.quantile(np.abs(np.asarray(x)).reshape(3, -1), 0.9, axis=1), 1.0, 1.3)[:, None, None, None]
    np.testing.assert_allclose(np.asarray(th(x)), np.clip(np.asarray(x), -s, s) / s, rtol=1e-6)
    with pytest.raises(ValueError, match="sample_max_value"):
        Threshold(0.9, 0.5)


def test_check_schedule_names_the_betas():
    imp = sampler_from_diffusers({"_class_name": "DDIMScheduler", **LINEAR}, 10)
    imp.check_schedule(make_schedule("linear", 1000))
    with pytest.raises(ValueError, match="beta_schedule, beta_start"):
        imp.check_schedule(make_schedule("cosine", 1000))
    imp.check_schedule(make_schedule("linear", 1000), prediction="eps")
    with pytest.raises(ValueError, match="prediction_type='epsilon', but the model predicts 'v'"):
        imp.check_schedule(make_schedule("linear", 1000), prediction="v")


def test_nfe_search_and_jit():
    assert count_nfe_diffusers({"_class_name": "HeunDiscreteScheduler"}, 10) == 19
    assert steps_for_nfe_diffusers({"_class_name": "PNDMScheduler"}, 20) == (11, 20)     # K + 9 with the PRK warm-up
    with pytest.raises(ValueError, match="cannot run in 5 network evaluations"):
        steps_for_nfe_diffusers({"_class_name": "PNDMScheduler"}, 5)
    imp = sampler_from_diffusers({"_class_name": "UniPCMultistepScheduler"}, 6)
    z = jax.random.normal(jax.random.key(0), (2, 3))
    net = lambda x, t: 0.1 * x
    eager = imp.sample(net, jax.random.key(1), z.shape, noise=z)[0]
    jitted = jax.jit(lambda z: imp.sample(net, jax.random.key(1), z.shape, noise=z)[0])(z)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-6)


def test_to_diffusers_config_round_trips_or_says_why():
    base = {**LINEAR, "prediction_type": "epsilon"}
    for name, spacing in (("ddim", "leading"), ("euler", "karras"), ("heun", "logsnr"), ("dpmpp_2m", "trailing"),
                          ("unipc_bh2", "trailing"), ("ddpm", "linspace"), ("pndm", "leading")):
        cfg = to_diffusers_config(name, 12, schedule_config=base, spacing=spacing)
        imp = sampler_from_diffusers(cfg, 12)
        grid = discrete_grid(make_schedule("linear", 1000), 12, spacing)
        np.testing.assert_allclose(np.asarray(imp.grid.sigma), np.asarray(grid.sigma), rtol=1e-5, atol=1e-7)
    for name, spacing, kw, match in [
            ("dpmpp_2m", "leading", {}, "picks other levels"),
            ("dpmpp_3m", "trailing", {}, "diffusers_3m"),
            ("ddim", "leading", {"clip_denoised": 1.0}, "keeps the network's eps_hat"),
            ("euler", "trailing", {"clip_denoised": 1.0}, "does not clip"),
            ("adaptive", "trailing", {}, "has no diffusers scheduler"),
            ("ddim", "quadratic", {}, "no diffusers timestep_spacing")]:
        with pytest.raises(ValueError, match=match):
            to_diffusers_config(name, 12, schedule_config=base, spacing=spacing, **kw)


def test_docs_schedulers_md_is_generated_from_the_code():
    """docs/schedulers.md is `python -m diffusion_jax.samplers.diffusers_docs`: regenerate it when a builder changes."""
    import pathlib

    from diffusion_jax.samplers.diffusers_docs import scheduler_markdown

    path = pathlib.Path(__file__).parents[2] / "docs" / "schedulers.md"
    assert path.read_text() == scheduler_markdown(), "docs/schedulers.md is stale: regenerate it (module doc)"


def test_docs_diffusers_models_md_is_generated_from_the_code():
    import pathlib

    from diffusion_jax.models.diffusers_docs import markdown

    path = pathlib.Path(__file__).parents[2] / "docs" / "diffusers_models.md"
    assert path.read_text() == markdown(), "docs/diffusers_models.md is stale: regenerate it (module doc)"


def test_edm_schedulers_need_an_edm_model_with_their_sigma_data():
    from diffusion_jax.process.sde import EDMSchedule

    imp = sampler_from_diffusers({"_class_name": "EDMEulerScheduler", "sigma_data": 0.6}, 8)
    assert imp.sampler == "euler" and imp.plan.prediction == "edm" and imp.abar is None
    np.testing.assert_allclose(float(imp.grid.sigma[0]), 80.0, rtol=1e-6)
    assert np.all(np.asarray(imp.grid.alpha) == 1.0) and float(imp.grid.sigma[-1]) == 0.0
    imp.check_schedule(EDMSchedule(sigma_data=0.6))
    for other in (EDMSchedule(sigma_data=0.5), make_schedule("linear", 1000)):
        with pytest.raises(ValueError, match="EDM-preconditioned network with sigma_data=0.6"):
            imp.check_schedule(other)
    with pytest.raises(ValueError, match="prediction_type='v_prediction' is not supported"):
        sampler_from_diffusers({"_class_name": "EDMEulerScheduler", "prediction_type": "v_prediction"}, 8)
    with pytest.raises(ValueError, match="sigma_min=90.0 must be in"):
        sampler_from_diffusers({"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": 90.0}, 8)
