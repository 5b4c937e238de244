"""score_sde's projection method for any registered sampler (Song et al. 2021, app. I.2 and I.3).

The conditional reverse SDE needs grad log p_t(Omega_bar(x_t) | Omega(x_0) = y); score_sde approximates it by the
unconditional score at [Omega_bar(x_t); Omega_hat(x_t)], where Omega_hat(x_t) is "a random sample from
p_t(Omega(x_t) | Omega(x_0) = y)", i.e. the forward-noised known part alpha_t y + sigma_t z. Its code
(controllable_generation.get_inpaint_update_fn) writes that sample into the state after every predictor and
corrector step, drawing a new z each time. Here the same replacement is made on the network's input:

    denoise_fn'(x_t, t) = denoise_fn( m * (alpha_t y + sigma_t z) + (1 - m) * x_t, t )        (`Known.substitute`)

with (alpha_t, sigma_t) the level the sampler means by t (`levels.noise_level`), and after the sampler returns

    x_0 <- m * y + (1 - m) * x_0                                                               (`Known.project`)

so the known pixels are exactly y. Why the input and not the state: every solver update is elementwise in
(state, x0_hat, eps_hat), so a hole pixel of the result depends only on the hole pixels of the state and on the
network outputs; those outputs see the replaced input, exactly as if the state had been replaced before the call.
Replacing also x0_hat's known part by y would change only the known part of the state, which the network never
sees and the final projection overwrites, so it is not done. (Heun and other multi-evaluation steps get a fresh
replacement at each evaluation's own level, where score_sde replaces once per step.)

noise="fresh" (the paper; default): z is new at every noise level (drawn from fold_in(key, bits of t)); the
  Langevin corrector steps of "pc", evaluated at one level, share it.
noise="fixed": one z per sample for the whole run, so the known part follows one forward path alpha_t y + sigma_t z
  and a deterministic sampler becomes a deterministic map. The adaptive ODE solver needs it (its field must be
  smooth in t).
The method is an approximation: for correlated data the fill is pulled only part of the way to the exact
conditional (tests/unit/test_editing.py measures it on a Gaussian); RePaint's resampling (`repaint.py`) reduces that.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.inference.editing.known import Known
from diffusion_jax.inference.editing.levels import noise_level
from diffusion_jax.samplers import run_sampler

NOISES = ("fresh", "fixed")


def check_noise(noise: str, sampler: str | None = None) -> None:
    if noise not in NOISES:
        raise ValueError(f"noise={noise!r} is unknown; choose from {NOISES}")
    if sampler == "adaptive" and noise != "fixed":
        raise ValueError("sampler 'adaptive' integrates an ODE whose field must be smooth in t; a fresh z at every "
                         "level makes it rough: use noise='fixed' with it")


def level_key(key, t):
    """A key for the level of network time t (B,): fold_in(key, the float32 bits of t[0])."""
    bits = jax.lax.bitcast_convert_type(jnp.reshape(jnp.asarray(t), (-1,))[0].astype(jnp.float32), jnp.int32)
    return jax.random.fold_in(key, bits)


def conditioned(denoise_fn, known: Known, schedule, key, *, prediction: str = "eps", noise: str = "fresh"):
    """denoise_fn(x, t) whose input has its known part replaced by alpha_t y + sigma_t z (module doc)."""
    check_noise(noise)

    def fn(x, t):
        alpha, sigma = noise_level(schedule, t, prediction)
        z = jax.random.normal(key if noise == "fixed" else level_key(key, t), x.shape, x.dtype)
        return denoise_fn(known.substitute(x, alpha, sigma, z), t)

    return fn


def sample_known(name: str, denoise_fn, schedule, key, known: Known, *, steps: int, prediction: str = "eps",
                 noise: str = "fresh", uncond_fn=None, **run_options):
    """Sample the unknown part of `known` with sampler `name` by the projection method (module doc).

    run_options go to `run_sampler` (spacing, clip_denoised, guidance, options, rho). The key is split: one half
    drives the sampler (x_T, its own noise), the other the known part's z. Returns (x (N, H, W, C), info)
    with info["nfe"] from the sampler; the known part of x is exactly known.values (in known's space).
    """
    check_noise(noise, name)
    k_run, k_known = jax.random.split(key)
    wrap = lambda fn: None if fn is None else conditioned(fn, known, schedule, k_known, prediction=prediction,
                                                          noise=noise)
    x, info = run_sampler(name, wrap(denoise_fn), schedule, k_run, known.shape, steps=steps, prediction=prediction,
                          uncond_fn=wrap(uncond_fn), **run_options)
    return known.project(x), info
