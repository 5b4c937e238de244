"""Ancestral DDPM sampling (Ho, Jain & Abbeel 2020, Alg. 2) on the levels of a `Grid`, with the learned variances of
improved DDPM (Nichol & Dhariwal 2021).

Each step samples the posterior of the forward process between two levels, p(x_{i+1} | x_i) = q(x_{i+1} | x_i,
x0_hat) = N(mu, Sigma_i). With alpha_{i|i+1} = alpha_i / alpha_{i+1} and beta_i = sigma_i^2 - alpha_{i|i+1}^2
sigma_{i+1}^2 (the variance of q(x_i | x_{i+1}); on a VP schedule 1 - abar_t / abar_prev, Ho et al.'s beta_t after
respacing, N&D sec. 4):

    mu = alpha_{i+1} beta_i / sigma_i^2 x0_hat + alpha_{i|i+1} sigma_{i+1}^2 / sigma_i^2 x_i        (Ho et al. eq. 7)
    fixed_small  Sigma_i = beta~_i = sigma_{i+1}^2 / sigma_i^2 beta_i                         (Ho et al. sec. 3.2)
    fixed_large  Sigma_i = beta_i
    learned      log Sigma_i = v log beta_i + (1 - v) log beta~_i, v = (out + 1) / 2       (Nichol & Dhariwal eq. 15)

With x0_hat from eq. 15 the mean is Alg. 2's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps). No noise is added
on the step to the clean level (z = 0 at t = 1 in Alg. 2). Written in (alpha, sigma), it holds for any Gaussian
process (VP, sub-VP, VE, EDM levels).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers.checks import check_bool, check_choice, check_key
from diffusion_jax.samplers.euler import check_grid, with_trajectory
from diffusion_jax.samplers.grid import transitions

VARIANCES = ("fixed_small", "fixed_large", "learned")


def ddpm(denoiser, grid, x_T, key=None, *, variance: str = "fixed_small", return_trajectory: bool = False):
    """Ancestral sampling over the K steps of `grid` from x_T. Returns (x_0, {"nfe": K, "trajectory" if asked}).

    variance="learned" needs a denoiser made with `make_denoiser(..., learned_variance=True)`: it returns
    (x0_hat, eps_hat, v) with v in [-1, 1] from the network's last C output channels. Noise of step i:
    jax.random.fold_in(key, i).
    """
    x_T = check_grid(grid, x_T)
    check_choice("variance", variance, VARIANCES)
    check_bool(return_trajectory=return_trajectory)
    check_key(key, "ddpm")
    a, s = grid.alpha, grid.sigma
    a_ratio, beta, beta_tilde = transitions(grid)                              # alpha_{i|i+1}, beta_i, beta~_i
    coef_x0 = a[1:] * beta / s[:-1] ** 2                                       # eq. 7
    coef_xt = a_ratio * s[1:] ** 2 / s[:-1] ** 2                               # eq. 7
    noisy = s[1:] > 0                                                          # no noise onto the clean level
    # Ho et al.'s code clips log beta~ at the clean step to the next-to-last value (it is -inf there, where no
    # noise is added): keeps the learned interpolation finite.
    log_small = jnp.log(jnp.where(noisy, beta_tilde, jnp.roll(beta_tilde, 1)))
    log_large = jnp.where(noisy, jnp.log(beta), log_small)
    K = grid.num_steps
    xs = (jnp.arange(K), grid.t[:-1], a[:-1], s[:-1], coef_x0, coef_xt, log_small, log_large, noisy)

    def step(x, inp):
        i, t, alpha, sigma, c0, ct, logvar_small, logvar_large, is_noisy = inp
        out = denoiser(x, t, alpha, sigma)
        if variance == "learned":
            if len(out) != 3:
                raise ValueError("sampler.variance='learned' needs a denoiser with the network's variance channels: "
                                 "make_denoiser(..., learned_variance=True)")
            x0, _, v = out
            frac = (v + 1.0) / 2.0
            logvar = frac * logvar_large + (1.0 - frac) * logvar_small                      # N&D eq. 15
        else:
            x0 = out[0]
            logvar = logvar_small if variance == "fixed_small" else logvar_large
        mean = c0 * x0 + ct * x                                                             # eq. 7
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x_next = (mean + jnp.where(is_noisy, jnp.exp(0.5 * logvar), 0.0) * z).astype(x.dtype)  # Alg. 2, line 4
        return x_next, (x_next if return_trajectory else None)

    x, traj = jax.lax.scan(step, x_T, xs)
    return x, {"nfe": K, **with_trajectory(x_T, traj, return_trajectory)}
