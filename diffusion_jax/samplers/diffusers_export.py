"""Our sampler as a diffusers scheduler config: the inverse of `diffusers_import.sampler_from_diffusers`.

    cfg = to_diffusers_config("dpmpp_2m", 20, schedule_config={"beta_schedule": "scaled_linear", ...},
                              spacing="karras")       # {"_class_name": "DPMSolverMultistepScheduler", ...}

The config is checked by importing it back: diffusers must run the same solver with the same options on the same
grid (t, alpha, sigma to 1e-5) from the same x_T (init_noise_sigma to 1e-4), or a ValueError says what differs.
Several of our settings have no diffusers equivalent (quadratic spacing, DDIM's eta or clipping with eps re-derived,
the leading grid of the DPM-Solver family, which diffusers builds from K + 1 points): those are refused.
"""
from __future__ import annotations

import inspect

import numpy as np

from diffusion_jax.process.discrete import DiscreteSchedule
from diffusion_jax.samplers.diffusers_import import META_KEYS, sampler_from_diffusers
from diffusion_jax.samplers.diffusers_levels import betas_from_config
from diffusion_jax.samplers.diffusers_schedulers import SCHEDULERS, Keys
from diffusion_jax.samplers.grid import discrete_grid
from diffusion_jax.samplers.registry import get_entry

_DPM = {"algorithm": "algorithm_type", "order": "solver_order", "solver_type": "solver_type",
        "lower_order_final": "lower_order_final", "euler_at_final": "euler_at_final"}
# our sampler -> (diffusers class, {our option: diffusers key}); options that are not keys must keep their defaults
CLASSES = {
    "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {"variance": "variance_type"}),
    "plms": ("PNDMScheduler", {}), "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}), "kdpm2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm_multistep": ("DPMSolverMultistepScheduler", _DPM), "dpmpp_2m": ("DPMSolverMultistepScheduler", _DPM),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", _DPM), "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", _DPM),
    "dpm_singlestep": ("DPMSolverSinglestepScheduler", _DPM), "dpmpp_2s": ("DPMSolverSinglestepScheduler", _DPM),
    "dpm_solver_1": ("DPMSolverSinglestepScheduler", _DPM), "dpm_solver_2": ("DPMSolverSinglestepScheduler", _DPM),
    "dpm_solver_3": ("DPMSolverSinglestepScheduler", _DPM),
    "unipc_bh1": ("UniPCMultistepScheduler", {"order": "solver_order", "predict_x0": "predict_x0",
                                              "lower_order_final": "lower_order_final",
                                              "disable_corrector": "disable_corrector"}),
    "deis": ("DEISMultistepScheduler", {"order": "solver_order", "lower_order_final": "lower_order_final"}),
}
CLASSES["unipc_bh2"] = CLASSES["unipc_bh1"]
_VARIANCES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large", "learned": "learned_range"}
SPACINGS = {"leading": {"timestep_spacing": "leading"}, "trailing": {"timestep_spacing": "trailing"},
            "linspace": {"timestep_spacing": "linspace"}, "uniform": {"timestep_spacing": "linspace"},
            "karras": {"timestep_spacing": "linspace", "use_karras_sigmas": True},
            "logsnr": {"timestep_spacing": "linspace", "use_exponential_sigmas": True}}


def _solver_setup(name: str, options: dict) -> tuple:
    """(solver function, every option with its default filled in): equal for two registry names that run the same."""
    entry = get_entry(name)
    params = inspect.signature(entry.fn).parameters
    full = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    full.update(entry.fixed, **options)
    for k in ("return_trajectory", "half_grid", "key"):
        full.pop(k, None)
    full = {k: tuple(v) if isinstance(v, list) else v for k, v in full.items()}
    return entry.fn, full


def to_diffusers_config(name: str, steps: int, *, schedule_config: dict, spacing: str = "leading",
                        options: dict | None = None, clip_denoised: float | None = None) -> dict:
    """The diffusers scheduler config that runs our sampler `name` (with `options`, `spacing`, `clip_denoised`) at
    `steps` steps on the discrete schedule of `schedule_config` (num_train_timesteps, beta_schedule, beta_start,
    beta_end, trained_betas, prediction_type, rescale_betas_zero_snr) exactly as we run it; ValueError otherwise."""
    options = dict(options or {})
    if name not in CLASSES:
        raise ValueError(f"sampler {name!r} has no diffusers scheduler; those that do: {sorted(CLASSES)}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing {spacing!r} has no diffusers timestep_spacing; one of {sorted(SPACINGS)}")
    cls, keys = CLASSES[name]
    defaults = SCHEDULERS[cls].defaults
    base = {k: v for k, v in schedule_config.items() if k in defaults and k not in META_KEYS}
    cfg = {"_class_name": cls, **base, **SPACINGS[spacing]}
    fn, ours = _solver_setup(name, options)
    for ours_key, key in keys.items():
        if ours_key in ours and key in defaults:
            value = ours[ours_key]
            cfg[key] = _VARIANCES.get(value, value) if ours_key == "variance" else (
                list(value) if isinstance(value, tuple) else value)
    if name == "pndm":
        cfg["skip_prk_steps"] = False
    if name == "plms":
        cfg["skip_prk_steps"] = True
    if name in ("ddim", "pndm", "plms"):
        cfg["set_alpha_to_one"] = True
    if name.startswith("unipc"):
        cfg["solver_type"] = name[-3:]
    if "clip_sample" in defaults:
        cfg["clip_sample"] = clip_denoised is not None
        cfg["clip_sample_range"] = float(clip_denoised or 1.0)
    elif clip_denoised is not None:
        raise ValueError(f"clip_denoised={clip_denoised}: diffusers' {cls} does not clip x0_hat")
    cfg = {k: v for k, v in cfg.items() if k == "_class_name" or k in defaults}
    _check_round_trip(cfg, name, fn, ours, steps, spacing, clip_denoised)
    return cfg


def _check_round_trip(cfg, name, fn, ours, steps, spacing, clip_denoised) -> None:
    imp = sampler_from_diffusers(cfg, steps)
    theirs_fn, theirs = _solver_setup(imp.sampler, imp.plan.options)
    what = f"sampler {name!r} with spacing {spacing!r} at {steps} steps"
    if theirs_fn is not fn or theirs != ours:
        diff = {k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
        raise ValueError(f"{what}: diffusers' {cfg['_class_name']} runs other options (ours, theirs): {diff}")
    betas = betas_from_config(Keys(cfg["_class_name"], cfg, SCHEDULERS[cfg["_class_name"]].defaults))
    grid = discrete_grid(DiscreteSchedule.from_betas(betas), steps, spacing)
    a, b = imp.grid, grid
    if a.t.shape != b.t.shape or not (np.allclose(a.t, b.t, atol=1e-3) and np.allclose(a.alpha, b.alpha, rtol=1e-5)
                                      and np.allclose(a.sigma, b.sigma, rtol=1e-5, atol=1e-7)):
        raise ValueError(f"{what}: diffusers' {cfg['_class_name']} picks other levels than ours")
    if not (np.isclose(imp.plan.noise_scale, 1.0, rtol=1e-4) and np.isclose(imp.plan.out_scale, 1.0, rtol=1e-6)):
        raise ValueError(f"{what}: diffusers' {cfg['_class_name']} starts from x_T = {imp.plan.noise_scale:.6g} z "
                         "(its init_noise_sigma), ours from z")
    if clip_denoised is not None and not imp.plan.rederive_eps:
        raise ValueError(f"{what}: diffusers' {cfg['_class_name']} keeps the network's eps_hat after clipping "
                         "x0_hat (use_clipped_model_output=False), ours re-derives it")
