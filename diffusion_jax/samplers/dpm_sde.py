"""DPM-Solver-SDE: the stochastic second-order midpoint sampler of diffusers' DPMSolverSDEScheduler (k-diffusion's
"DPM++ SDE" family, Lu et al. 2022b with ancestral noise), in y = x / alpha, s = sigma / alpha (EDM / VE coordinates).

Each step s_i -> s_{i+1} has two stages, each a first-order DPM-Solver step (exact in the linear part) taken
ancestrally (eta = 1, `kdpm2.ancestral_levels`: sigma_up, s_down of a step s -> s_to):

    A(y, x0_hat; s -> s_to, z) = y + (s_down - s) (y - x0_hat) / s + s_noise sigma_up z
    stage 1, to the midpoint s_mid = sqrt(s_i s_{i+1}) (in log s):  y_mid = A(y_i, D(y_i; s_i); s_i -> s_mid, z_1)
    stage 2, from y_i with the midpoint's denoiser:   y_{i+1} = A(y_i, D(y_mid; s_mid); s_i -> s_{i+1}, z_2)

The two noises are increments of one Brownian motion W(s) (diffusers draws them from a Brownian tree in s): z_1 =
(W(s_mid) - W(s_i)) / sqrt(s_i - s_mid) and z_2 = (W(s_{i+1}) - W(s_i)) / sqrt(s_i - s_{i+1}), so
    z_2 = (sqrt(s_i - s_mid) z_1 + sqrt(s_mid - s_{i+1}) w) / sqrt(s_i - s_{i+1}),
with z_1 from fold_in(key, 2 i) and w from fold_in(key, 2 i + 1) (the tree itself, torchsde's, is not reproduced:
the same joint law, other draws). A step to the clean level is a plain Euler step y_i - s_i (y_i - x0_hat) / s_i,
with no noise and one denoiser call. NFE: K + the number of steps with a noisy target (2K - 1 on a grid ending at 0).

The midpoints are those of KDPM2 (`kdpm2.kdpm2_half_grid(process, grid)`: on a discrete schedule, the fractional
timestep of s_mid from the table, diffusers' _sigma_to_t); without a half_grid they are interpolated between the
grid's levels. Carry y; trajectory and result in the grid's VP coordinates.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers.checks import check_bool, check_key, check_number
from diffusion_jax.samplers.euler import check_grid, interpolated_level, noisy_targets, with_trajectory
from diffusion_jax.samplers.grid import Grid
from diffusion_jax.samplers.kdpm2 import ancestral_levels, check_half_grid, midpoint_options
from diffusion_jax.samplers.wrapper import ode_derivative


def brownian_pair(key, i, s_cur, s_mid, s_next, shape, dtype):
    """(z_1, z_2) of step i (module doc): standard normals whose correlation is sqrt((s - s_mid) / (s - s_next)), the
    normalised increments of one Brownian motion over [s_mid, s] and [s_next, s]."""
    z1 = jax.random.normal(jax.random.fold_in(key, 2 * i), shape, dtype)
    w = jax.random.normal(jax.random.fold_in(key, 2 * i + 1), shape, dtype)
    d1, d2 = s_cur - s_mid, s_mid - s_next
    return z1, (jnp.sqrt(d1) * z1 + jnp.sqrt(d2) * w) / jnp.sqrt(d1 + d2)


def dpm_solver_sde(denoiser, grid: Grid, x_T, key=None, *, half_grid: Grid | None = None, s_noise: float = 1.0,
                   return_trajectory: bool = False):
    """DPM-Solver-SDE (module doc; diffusers' DPMSolverSDEScheduler at s_noise = 1) over the K steps of `grid` from x_T
    (VP coordinates). half_grid: kdpm2_half_grid(process, grid), or None to interpolate the midpoints. Noise of step
    i: fold_in(key, 2 i) and fold_in(key, 2 i + 1). Returns (x_0, {"nfe", "trajectory" if asked})."""
    x_T = check_grid(grid, x_T)
    check_bool(return_trajectory=return_trajectory)
    s_noise = check_number("s_noise", s_noise)
    check_key(key, "dpm_sde")
    K = grid.num_steps
    check_half_grid(grid, half_grid, ancestral=False)
    s = grid.sigma_ve
    level_of_s = interpolated_level(grid) if half_grid is None else None
    half = (jnp.zeros((K,)),) * 3 if half_grid is None else (half_grid.t, half_grid.alpha, half_grid.sigma)
    deriv = ode_derivative(denoiser)
    xs = (jnp.arange(K), grid.t[:-1], grid.alpha[:-1], grid.sigma[:-1], s[:-1], grid.alpha[1:], s[1:], half)

    def ancestral(y, d, s_cur, s_to, z):
        s_up, s_down = ancestral_levels(s_cur, s_to)
        return y + (s_down - s_cur) * d + s_noise * s_up * z

    def step(y, inp):
        i, t, a, sg, s_cur, a_n, s_next, (t_h, a_h, sg_h) = inp
        d, _ = deriv(y, t, a, sg)

        def two_stages(y):
            lvl = (t_h, a_h, sg_h) if level_of_s is None else level_of_s(jnp.sqrt(s_cur * s_next))
            s_mid = lvl[2] / lvl[1]
            z1, z2 = brownian_pair(key, i, s_cur, s_mid, s_next, y.shape, y.dtype)
            y_mid = ancestral(y, d, s_cur, s_mid, z1)
            _, x0_mid = deriv(y_mid, *lvl)
            return ancestral(y, (y - x0_mid) / s_cur, s_cur, s_next, z2).astype(y.dtype)

        y_next = jax.lax.cond(s_next > 0, two_stages, lambda y: (y - s_cur * d).astype(y.dtype), y)
        return y_next, (a_n * y_next if return_trajectory else None)

    y, xs_out = jax.lax.scan(step, (x_T / grid.alpha[0]).astype(x_T.dtype), xs)
    return grid.alpha[-1] * y, {"nfe": K + noisy_targets(grid), **with_trajectory(x_T, xs_out, return_trajectory)}


def dpm_sde_options(process, grid: Grid | None) -> dict:
    """The registry's `from_process` for 'dpm_sde': KDPM2's midpoints sqrt(s_i s_{i+1}) (kdpm2_half_grid)."""
    return midpoint_options(process, grid, "dpm_sde")
