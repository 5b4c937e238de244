"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1) on the levels of a `Grid`.

A consistency model's denoiser returns f(x, t), the start of x's ODE trajectory (`objectives.distill`): one
evaluation at the noisiest level is a sample. More steps alternate denoising and re-noising to the next level,

    y <- f(x_0, t_0);   for i = 1 .. K - 1:   x_i = alpha_i (y + sqrt(s_i^2 - s_end^2) z_i),  y <- f(x_i, t_i)

in EDM coordinates s = sigma / alpha, where s_end is the grid's last level (0 at a clean end; the paper's epsilon
when the grid stops at t_min) and z_i ~ N(0, I) from fold_in(key, i). NFE = K: every level but the last is evaluated.
Any x0 predictor can be sampled this way (for a diffusion model it is a crude restart sampler); for a consistency
model the levels are the ones it should be sampled at, e.g. "trailing": K = 2 re-noises to t_max / 2.

diffusers' LCMScheduler (latent consistency models, Luo et al. 2023) is this algorithm on a clean-ended grid with its
own consistency function of the discrete timestep t, `lcm_boundary`: f = c_skip(t) x_t + c_out(t) x0_hat.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers.checks import check_bool, check_key
from diffusion_jax.samplers.euler import check_grid, with_trajectory
from diffusion_jax.samplers.wrapper import eps_from_x0


def multistep_consistency(denoiser, grid, x_T, key=None, *, return_trajectory: bool = False):
    """Algorithm 1 over the K steps of `grid` from x_T. Returns (x_0, {"nfe": K, "trajectory" if asked: the K
    denoised estimates after x_T})."""
    x_T = check_grid(grid, x_T)
    check_bool(return_trajectory=return_trajectory)
    K = grid.num_steps
    if K > 1:
        check_key(key, "consistency sampling with more than one step")
    s = grid.sigma_ve
    s_end = s[-1]
    y, _ = denoiser(x_T, grid.t[0], grid.alpha[0], grid.sigma[0])
    y = y.astype(x_T.dtype)
    if K == 1:
        return y, {"nfe": 1, **with_trajectory(x_T, y[None], return_trajectory)}
    xs = (jnp.arange(1, K), grid.t[1:-1], grid.alpha[1:-1], grid.sigma[1:-1], s[1:-1])

    def step(y, inp):
        i, t, alpha, sigma, s_i = inp
        z = jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
        x = alpha * (y + jnp.sqrt(jnp.maximum(s_i ** 2 - s_end ** 2, 0.0)) * z)
        y_next = denoiser(x.astype(y.dtype), t, alpha, sigma)[0].astype(y.dtype)
        return y_next, (y_next if return_trajectory else None)

    y_last, traj = jax.lax.scan(step, y, xs)
    if return_trajectory:
        traj = jnp.concatenate([y[None], traj])
    return y_last, {"nfe": K, **with_trajectory(x_T, traj, return_trajectory)}


def lcm_boundary(denoiser, timestep_scaling: float, sigma_data: float = 0.5):
    """The denoiser of a latent consistency model as diffusers' LCMScheduler reads its network: the consistency
    function f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat, with c_skip = d^2 / ((k t)^2 + d^2) and
    c_out = k t / sqrt((k t)^2 + d^2) of the discrete timestep t (k = timestep_scaling, d = sigma_data), after
    `denoiser`'s clipping of x0_hat; eps_hat re-derived from f. Unlike `objectives.distill.ConsistencyParam` the skip
    term is x_t itself, not x_t / alpha_t: LCM's choice (c_skip(t) < 1e-5 for t >= 19 at k = 10)."""
    def den(x, t, alpha, sigma):
        x0 = denoiser(x, t, alpha, sigma)[0]
        kt = timestep_scaling * jnp.asarray(t, jnp.float32)
        c_skip = sigma_data ** 2 / (kt ** 2 + sigma_data ** 2)
        c_out = kt * jax.lax.rsqrt(kt ** 2 + sigma_data ** 2)
        f = (c_skip * x + c_out * x0).astype(x.dtype)
        return f, eps_from_x0(x, f, alpha, sigma)
    return den
