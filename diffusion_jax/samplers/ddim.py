"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models") on the levels of a `Grid`.

With the paper's alpha_t written alpha_i^2 here (x_i = alpha_i x0 + sigma_i eps), the generalized reverse step from
level i to level i + 1 is (eq. 12)

    x_{i+1} = alpha_{i+1} x0_hat + sqrt(sigma_{i+1}^2 - s_i^2) eps_hat + s_i z,
    x0_hat = (x_i - sigma_i eps_hat) / alpha_i                                                  (eq. 9)

    s_i(eta)^2 = eta^2 sigma_{i+1}^2 (1 - (alpha_i sigma_{i+1})^2 / (alpha_{i+1} sigma_i)^2)                (eq. 16)

the posterior variance of q(x_{i+1} | x_i, x0) times eta^2. On a VP schedule (alpha^2 + sigma^2 = 1) this is eq. 16's
(1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev); written in (alpha, sigma) it holds for any Gaussian process
(VE, sub-VP, EDM). eta = 0 is the deterministic DDIM, an Euler step of the probability-flow ODE in sigma / alpha;
eta = 1 is ancestral sampling on the grid's levels. A grid ending at the clean level (sigma = 0, diffusers'
set_alpha_to_one) returns x0_hat of the last step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers.checks import check_bool, check_key, check_number
from diffusion_jax.samplers.euler import check_grid, with_trajectory
from diffusion_jax.samplers.grid import transitions


def ddim(denoiser, grid, x_T, key=None, *, eta: float = 0.0, return_trajectory: bool = False):
    """DDIM over the K steps of `grid` from x_T. Returns (x_0, {"nfe": K, "trajectory" if asked}).

    eta > 0 adds noise (eq. 16) drawn from jax.random.fold_in(key, i) at step i.
    """
    x_T = check_grid(grid, x_T)
    eta = check_number("eta", eta)
    check_bool(return_trajectory=return_trajectory)
    if eta > 0:
        check_key(key, "ddim with eta > 0")
    a, s = grid.alpha, grid.sigma
    s_eta = eta * jnp.sqrt(transitions(grid)[2])                      # eq. 16: eta^2 times the posterior variance
    c_dir = jnp.sqrt(jnp.maximum(s[1:] ** 2 - s_eta ** 2, 0.0))   # sqrt(1 - abar_prev - s^2); 0 only for eta > 1
    K = grid.num_steps
    xs = (jnp.arange(K), grid.t[:-1], a[:-1], s[:-1], a[1:], c_dir, s_eta)

    def step(x, inp):
        i, t, alpha, sigma, alpha_next, c, noise = inp
        x0, eps = denoiser(x, t, alpha, sigma)
        x_next = alpha_next * x0 + c * eps                                                      # eq. 12
        if eta > 0:
            x_next = x_next + noise * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x_next = x_next.astype(x.dtype)
        return x_next, (x_next if return_trajectory else None)

    x, traj = jax.lax.scan(step, x_T, xs)
    return x, {"nfe": K, **with_trajectory(x_T, traj, return_trajectory)}
