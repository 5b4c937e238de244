"""Which noise level a network input carries, read back from the time the sampler gives the network.

A wrapper around `denoise_fn(x, t)` sees only (x, t); to noise known pixels to the level of x it needs the
(alpha, sigma) with x = alpha x0 + sigma eps that the sampler meant by t. The samplers hand the network

    ddpm / ddim (discrete)      t = int32 DDPM timestep index          alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)
    grid samplers, discrete     t = float32 timestep, integral for the leading / trailing / linspace / uniform /
                                quadratic spacings (the tables), fractional for karras / logsnr: log-SNR linear
                                between the neighbouring timesteps (`DiscreteSchedule.interpolated_level`, diffusers'
                                _sigma_to_t; `grid.discrete_grid` interpolates log s = -log-SNR / 2 the same way)
    grid samplers, VP / sub-VP  t = sde.network_time(t) = time_scale t  -> the schedule's alpha, sigma at t
    grid samplers, VE / EDM     t = sigma (network_time(t) = sigma(t), alpha = 1)
    grid samplers, VDM          t = time_scale (gamma(t) - gamma_min) / (gamma_max - gamma_min)
    prediction "edm"            (x / alpha, s = sigma / alpha) (`samplers.wrapper.make_denoiser`): alpha = 1, sigma = s

Each process answers it (`network_level`, the process protocol), so one function of (schedule, t, prediction)
covers every sampler.
"""
from __future__ import annotations

import jax.numpy as jnp


def noise_level(schedule, t, prediction: str = "eps"):
    """(alpha, sigma), each float32 with the shape of t, of the level meant by network time t (module doc)."""
    t = jnp.asarray(t)
    if prediction == "edm":
        return jnp.ones(t.shape, jnp.float32), t.astype(jnp.float32)
    return schedule.network_level(t)
