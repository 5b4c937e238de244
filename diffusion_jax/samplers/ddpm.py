"""Ancestral DDPM sampling (Ho, Jain & Abbeel 2020, Alg. 2), with the respacing and learned variances of
improved DDPM (Nichol & Dhariwal 2021).

Each step samples p(x_{t-1} | x_t) = N(mu(x_t, x0_hat), Sigma_t) with the posterior mean (Ho et al. eq. 7)

    mu = sqrt(abar_prev) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t,

(with x0_hat from eq. 15 this is Alg. 2's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps)), and
    fixed_small  Sigma_t = beta~_t = (1 - abar_prev) / (1 - abar_t) beta_t                   (Ho et al. sec. 3.2)
    fixed_large  Sigma_t = beta_t
    learned      log Sigma_t = v log beta_t + (1 - v) log beta~_t, v = (out + 1) / 2        (Nichol & Dhariwal eq. 15)
No noise is added at the last step (z = 0 at t = 1 in Alg. 2). With `steps` < T the chain runs on the
respaced schedule: beta_t = 1 - abar_t / abar_prev between consecutive kept timesteps (N&D sec. 4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.param import to_x0_eps
from diffusion_jax.samplers.checks import check_choice
from diffusion_jax.samplers.spacing import check_prediction, initial_noise, respace, select_timesteps

VARIANCES = ("fixed_small", "fixed_large", "learned")


def ddpm_sample(denoise_fn, schedule, key, shape, *, steps: int | None = None, variance: str = "fixed_small",
                prediction: str = "eps", spacing: str = "leading", clip_denoised: float | None = 1.0, x_T=None):
    """Sample `shape` with ancestral DDPM. Returns (x_0, {"nfe": steps, "timesteps": np.ndarray}).

    steps=None uses all T training timesteps. For variance="learned", denoise_fn returns 2 C channels on the
    last axis: [prediction, v] with v in [-1, 1]. Noise: x_T from fold_in(key, 0) unless given; step i draws
    z from fold_in(key, i + 1).
    """
    T = schedule.num_timesteps
    timesteps = select_timesteps(T, T if steps is None else steps, spacing)
    check_choice("variance", variance, VARIANCES)
    check_prediction(prediction, clip_denoised)
    shape = tuple(shape)
    n = len(timesteps)
    tab = respace(schedule, timesteps)
    last = jnp.arange(n) == n - 1
    coef_x0 = tab.alpha_prev * tab.beta / tab.sigma ** 2                              # eq. 7
    coef_xt = jnp.sqrt(1.0 - tab.beta) * tab.sigma_prev ** 2 / tab.sigma ** 2         # eq. 7
    # Ho et al.'s code: log beta_t, with log beta~ at the last step (where no noise is added anyway).
    logvar_large = jnp.where(last, tab.posterior_log_variance_clipped, jnp.log(tab.beta))

    def step(x, inp):
        i, t, alpha, sigma, c0, ct, logvar_small, logvar_large, is_last = inp
        out = denoise_fn(x, jnp.full((shape[0],), t, jnp.int32))
        if variance == "learned":
            if out.shape[-1] != 2 * shape[-1]:
                raise ValueError(f"variance='learned' needs 2*{shape[-1]} output channels, got {out.shape[-1]}")
            out, v = jnp.split(out, 2, axis=-1)
            frac = (v + 1.0) / 2.0
            logvar = frac * logvar_large + (1.0 - frac) * logvar_small                # N&D eq. 15
        else:
            logvar = logvar_small if variance == "fixed_small" else logvar_large
        x0, _ = to_x0_eps(prediction, out, x, alpha, sigma)
        if clip_denoised is not None:
            x0 = jnp.clip(x0, -clip_denoised, clip_denoised)
        mean = c0 * x0 + ct * x                                                       # eq. 7
        z = jax.random.normal(jax.random.fold_in(key, i + 1), shape, x.dtype)
        x_prev = mean + jnp.where(is_last, 0.0, jnp.exp(0.5 * logvar)) * z              # Alg. 2, line 4
        return x_prev.astype(x.dtype), None

    xs = (jnp.arange(n), tab.t, tab.alpha, tab.sigma, coef_x0, coef_xt, tab.posterior_log_variance_clipped,
          logvar_large, last)
    x, _ = jax.lax.scan(step, initial_noise(key, shape, x_T), xs)
    return x, {"nfe": n, "timesteps": timesteps}
