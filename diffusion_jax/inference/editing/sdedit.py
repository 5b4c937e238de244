"""SDEdit image-to-image (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations", Alg. 1): noise the guide image to an intermediate time t_0 and run the reverse process
from there,

    x(t_0) = alpha(t_0) x_guide + sigma(t_0) z,    then N steps from t_0 down to 0     (Alg. 1: Delta t = t_0 / N)

strength in (0, 1] picks t_0 as a fraction of the schedule: a DiscreteSchedule keeps its first T_0 =
max(1, round(strength T)) timesteps (its tables cut to [0, T_0), bit for bit); a continuous schedule gets
t_max = t_min + strength (t_max - t_min) (SDEdit's t_0 for VP / VE), except EDM, whose time is sigma itself:
sigma_max = sigma_min (sigma_max / sigma_min)^strength (log sigma, as VE's time). Every registered sampler
then runs unchanged on the truncated schedule with its own spacing over [0, t_0] (`run_sampler` with x_T), and
x(t_0) is noised to the first level of the grid it will use (`samplers.grid`; DDPM / DDIM select the same first
timestep). On a discrete schedule steps are capped at T_0 (as diffusers runs int(steps strength) steps).
strength = 1 is plain sampling from x_T ~ N(0, (alpha^2 + sigma^2) I): the image is ignored exactly
(alpha_T x_guide is dropped).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from diffusion_jax.samplers import run_sampler
from diffusion_jax.samplers.grid import continuous_grid, discrete_grid


def check_strength(strength) -> float:
    if strength is None:
        raise ValueError("task 'img2img' needs a strength in (0, 1] (--strength on the command line): the fraction "
                         "of the schedule to re-noise, e.g. 0.6")
    if isinstance(strength, bool) or not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise ValueError(f"strength must be a number in (0, 1] (the fraction of the schedule to re-noise), "
                         f"got {strength!r}")
    return float(strength)


def truncate_schedule(schedule, strength: float):
    """The schedule restricted to [0, t_0] (module doc; each process's `truncate`)."""
    return schedule.truncate(check_strength(strength))


def img2img(name: str, denoise_fn, schedule, key, images, *, strength: float, steps: int, spacing: str = "leading",
            rho: float = 7.0, **run_options):
    """SDEdit `images` (N, H, W, C) with sampler `name` (module doc). run_options go to `run_sampler`
    (prediction, clip_denoised, guidance, uncond_fn, options). x(t_0)'s z is drawn from fold_in(key, 0), as
    run_sampler draws x_T. Returns (x, info) with info["nfe"] and info["steps"] (after the cap)."""
    strength = check_strength(strength)
    shape = tuple(images.shape)
    if strength == 1.0:
        x, info = run_sampler(name, denoise_fn, schedule, key, shape, steps=steps, spacing=spacing, rho=rho,
                              **run_options)
        return x, {**info, "steps": steps}
    short = truncate_schedule(schedule, strength)
    discrete = short.discrete
    if discrete:
        steps = min(steps, short.num_timesteps) if isinstance(steps, int) else steps
    with jax.ensure_compile_time_eval():
        grid = (discrete_grid if discrete else continuous_grid)(short, steps, spacing, rho=rho)
    z = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
    x_T = grid.alpha[0] * jnp.asarray(images, jnp.float32) + grid.sigma[0] * z
    x, info = run_sampler(name, denoise_fn, short, key, shape, steps=steps, spacing=spacing, rho=rho, x_T=x_T,
                          **run_options)
    return x, {**info, "steps": steps}
