"""Which noise level a network input carries, read back from the time the sampler gives the network.

A wrapper around `denoise_fn(x, t)` sees only (x, t); to noise known pixels to the level of x it needs the
(alpha, sigma) with x = alpha x0 + sigma eps that the sampler meant by t. The samplers hand the network

    ddpm / ddim (discrete)      t = int32 DDPM timestep index          alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)
    grid samplers, discrete     t = float32 timestep, integral for the leading / trailing / linspace / uniform /
                                quadratic spacings (the tables), fractional for karras / logsnr: log-SNR linear
                                between the neighbouring timesteps (`testbed.discrete_alpha_sigma`, diffusers'
                                _sigma_to_t; `grid.discrete_grid` interpolates log s = -log-SNR / 2 the same way)
    grid samplers, VP / sub-VP  t = sde.network_time(t) = time_scale t  -> the schedule's alpha, sigma at t
    grid samplers, VE / EDM     t = sigma (network_time(t) = sigma(t), alpha = 1)
    prediction "edm"            (x / alpha, s = sigma / alpha) (`samplers.wrapper.make_denoiser`): alpha = 1, sigma = s

so one function of (schedule, t, prediction) covers every sampler.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.process.discrete import DiscreteSchedule
from diffusion_jax.process.sde import VESDE, VPSDE, EDMSchedule, SubVPSDE
from diffusion_jax.testbed.mixture import discrete_alpha_sigma


def noise_level(schedule, t, prediction: str = "eps"):
    """(alpha, sigma), each float32 with the shape of t, of the level meant by network time t (module doc)."""
    t = jnp.asarray(t)
    if prediction == "edm":
        return jnp.ones(t.shape, jnp.float32), t.astype(jnp.float32)
    if isinstance(schedule, DiscreteSchedule):
        if jnp.issubdtype(t.dtype, jnp.integer):
            return schedule.alpha(t), schedule.sigma(t)
        alpha, sigma = discrete_alpha_sigma(schedule, t)
        ti = jnp.clip(jnp.round(t), 0, schedule.num_timesteps - 1).astype(jnp.int32)
        on_table = t == ti                                    # integral float t: the tables, to the last bit
        return jnp.where(on_table, schedule.alpha(ti), alpha), jnp.where(on_table, schedule.sigma(ti), sigma)
    if isinstance(schedule, (VPSDE, SubVPSDE)):
        tc = t.astype(jnp.float32) / schedule.time_scale
        return schedule.alpha(tc).astype(jnp.float32), schedule.sigma(tc).astype(jnp.float32)
    if isinstance(schedule, (VESDE, EDMSchedule)):
        return jnp.ones(t.shape, jnp.float32), t.astype(jnp.float32)
    raise ValueError(f"schedule must be a DiscreteSchedule or one of diffusion_jax.process.sde's VPSDE / SubVPSDE / VESDE / "
                     f"EDMSchedule (editing maps the network time back to its noise level), got "
                     f"{type(schedule).__name__}")
