"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

With alpha_bar_t the cumulative product (the paper's alpha_t), the generalized reverse step is (eq. 12)

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat + sigma_t z,
    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)                                   (eq. 9)

    sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)        (eq. 16)

eta = 0 is the deterministic DDIM (an Euler step of the probability-flow ODE in sigma/alpha), eta = 1 is
ancestral DDPM sampling on the respaced schedule. The last step goes to abar_prev = 1 and returns x0_hat.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers.spacing import check_prediction, initial_noise, respace, select_timesteps
from diffusion_jax.samplers.wrapper import predict_x0_eps


def ddim_sample(denoise_fn, schedule, key, shape, *, steps: int, eta: float = 0.0, prediction: str = "eps",
                spacing: str = "leading", clip_denoised: float | None = 1.0, x_T=None):
    """Sample `shape` with DDIM. Returns (x_0, {"nfe": steps, "timesteps": np.ndarray}).

    denoise_fn(x, t) gets t as (B,) int32 training timesteps and returns a prediction of kind `prediction`.
    Noise: x_T from fold_in(key, 0) unless given; step i draws z from fold_in(key, i + 1) (eta > 0 only).
    """
    timesteps = select_timesteps(schedule.num_timesteps, steps, spacing)
    if not eta >= 0:
        raise ValueError(f"sampler.eta must be >= 0, got {eta!r}")
    check_prediction(prediction, clip_denoised)
    shape = tuple(shape)
    tab = respace(schedule, timesteps)
    sigma_eta = eta * jnp.sqrt(tab.posterior_variance)                                # eq. 16
    # sqrt(1 - abar_prev - sigma_t^2); clamped at 0, which only bites for eta > 1.
    c_dir = jnp.sqrt(jnp.maximum(tab.sigma_prev ** 2 - sigma_eta ** 2, 0.0))

    def step(x, inp):
        i, t, alpha, sigma, alpha_prev, c, s = inp
        out = denoise_fn(x, jnp.full((shape[0],), t, jnp.int32))
        x0, eps = predict_x0_eps(out, x, alpha, sigma, prediction, clip_denoised)
        x_prev = alpha_prev * x0 + c * eps                                            # eq. 12
        if eta > 0:
            x_prev = x_prev + s * jax.random.normal(jax.random.fold_in(key, i + 1), shape, x.dtype)
        return x_prev.astype(x.dtype), None

    xs = (jnp.arange(len(timesteps)), tab.t, tab.alpha, tab.sigma, tab.alpha_prev, c_dir, sigma_eta)
    x, _ = jax.lax.scan(step, initial_noise(key, shape, x_T), xs)
    return x, {"nfe": len(timesteps), "timesteps": timesteps}
