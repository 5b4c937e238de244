"""KDPM2 and KDPM2 ancestral: k-diffusion's DPM-Solver-2 variant (sample_dpm_2, sample_dpm_2_ancestral; Karras et
al. 2022's Heun-like second-order step with a midpoint, DPM-Solver-2 of Lu et al. 2022a in sigma), as diffusers'
KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler.

In y = x / alpha, s = sigma / alpha the PF-ODE is dy/ds = d(y; s) = eps_hat (`wrapper.ode_derivative`). Step i
from s_i to a target s_down (KDPM2: s_down = s_{i+1}) evaluates d at the midpoint in log s:

    s_mid = exp((log s_i + log s_down) / 2) = sqrt(s_i s_down)
    y_mid = y_i + (s_mid - s_i) d(y_i; s_i)
    y_{i+1} = y_i + (s_down - s_i) d(y_mid; s_mid)  [+ s_noise sigma_up z]

Ancestral (k-diffusion's get_ancestral_step with eta = 1, as Euler ancestral):
    sigma_up = sqrt(s_{i+1}^2 (s_i^2 - s_{i+1}^2) / s_i^2),   s_down = sqrt(s_{i+1}^2 - sigma_up^2)
and fresh noise z of step i from fold_in(key, i), drawn in y.

A step to the clean level (s_{i+1} = 0, so s_mid = 0) is a plain Euler step y_{i+1} = y_i - s_i d(y_i; s_i) with no
noise, as k-diffusion and diffusers take it: the denoiser is never called at sigma = 0. NFE: K + the number of
steps with a noisy target (2K - 1 on a grid ending at sigma = 0).

The midpoint is an off-grid level: `half_grid` holds its (t, alpha, sigma) per step (K levels; at a step to
sigma = 0 a placeholder, unused). `kdpm2_half_grid` computes it from the process: on a discrete schedule t is the
fractional timestep with that s (t linear in log s between the table's timesteps, diffusers' _sigma_to_t) and
alpha = 1 / sqrt(1 + s_mid^2); on a continuous one the schedule's own time and alpha. Without a half_grid the solver
interpolates t linearly in log s between the grid's own levels (`euler.interpolated_level`): right for a denoiser
that reads only (alpha, sigma) (EDM's), coarse for one that reads t from a few steps (8 Karras steps on DDPM's linear
schedule: t = 118 where the table gives 87). The carry is y; trajectory and result in the grid's VP coordinates.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.checks import check_bool, check_key, check_number
from diffusion_jax.samplers.euler import (
    check_grid,
    interpolated_level,
    noisy_targets,
    with_trajectory,
)
from diffusion_jax.samplers.grid import Grid, concrete_or_none, levels_of_s
from diffusion_jax.samplers.wrapper import ode_derivative


def ancestral_levels(s_cur, s_next):
    """(sigma_up, s_down) of a step s_cur -> s_next (module doc; numpy or JAX; 0, 0 at s_next = 0)."""
    xp = jnp if isinstance(s_cur, jax.Array) or isinstance(s_next, jax.Array) else np
    s_up = xp.minimum(s_next, s_next * xp.sqrt(xp.maximum(1.0 - (s_next / s_cur) ** 2, 0.0)))
    return s_up, xp.sqrt(xp.maximum(s_next ** 2 - s_up ** 2, 0.0))


def kdpm2_half_grid(process, grid: Grid, ancestral: bool = False) -> Grid:
    """The K midpoint levels s_mid = sqrt(s_i s_down) of `grid`'s steps on `process` (module doc), numpy float64 on
    the host, as a Grid. A step to sigma = 0 gets its own start level as a placeholder."""
    alpha, sigma, t = (np.asarray(v, np.float64) for v in (grid.alpha, grid.sigma, grid.t))
    s = sigma / alpha
    s_down = ancestral_levels(s[:-1], s[1:])[1] if ancestral else s[1:]
    noisy = s_down > 0
    s_mid = np.where(noisy, np.sqrt(s[:-1] * np.where(noisy, s_down, 1.0)), s[:-1])
    t_mid, a_mid, sg_mid = levels_of_s(process, s_mid)
    keep = lambda new, old: np.where(noisy, new, old[:-1])
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return Grid(t=f32(keep(t_mid, t)), alpha=f32(keep(a_mid, alpha)), sigma=f32(keep(sg_mid, sigma)))


def midpoint_options(process, grid, name: str, ancestral: bool = False) -> dict:
    """The registry's `from_process` of a sampler `name` on these midpoints: {"half_grid": kdpm2_half_grid(...)}."""
    if grid is None:
        raise ValueError(f"sampler {name!r} places its midpoints on the schedule's table and needs a concrete grid: "
                         "close over the schedule instead of passing it as a jit argument")
    return {"half_grid": kdpm2_half_grid(process, grid, ancestral)}


def kdpm2_options(process, grid: Grid | None) -> dict:
    """The registry's `from_process` for 'kdpm2': {"half_grid": kdpm2_half_grid(process, grid)}."""
    return midpoint_options(process, grid, "kdpm2", False)


def kdpm2_ancestral_options(process, grid: Grid | None) -> dict:
    """The registry's `from_process` for 'kdpm2_ancestral': its midpoints sqrt(s_i s_down) (kdpm2_half_grid)."""
    return midpoint_options(process, grid, "kdpm2_ancestral", True)


def _check_midpoints(grid, half_grid, ancestral: bool) -> None:
    """A concrete half_grid holds this solver's midpoints s_mid = sqrt(s_i s_down) (to 1e-3) at the noisy steps."""
    vals = [concrete_or_none(v) for v in (grid.alpha, grid.sigma, half_grid.alpha, half_grid.sigma)]
    if any(v is None for v in vals):
        return
    alpha, sigma, h_alpha, h_sigma = (np.asarray(v, np.float64) for v in vals)
    s = sigma / alpha
    s_down = ancestral_levels(s[:-1], s[1:])[1] if ancestral else s[1:]
    noisy = s_down > 0
    if not np.allclose((h_sigma / h_alpha)[noisy], np.sqrt(s[:-1] * s_down)[noisy], rtol=1e-3, atol=0):
        which = "kdpm2_half_grid(process, grid, ancestral=True)" if ancestral else "kdpm2_half_grid(process, grid)"
        raise ValueError(f"sampler.half_grid does not hold the midpoints sqrt(s_i s_down) of this grid's steps; "
                         f"build it with {which}")


def check_half_grid(grid: Grid, half_grid, ancestral: bool) -> None:
    """ValueError unless half_grid is None or a Grid of the K midpoints of `grid`'s steps (kdpm2_half_grid)."""
    K = grid.num_steps
    if half_grid is not None and (not isinstance(half_grid, Grid) or half_grid.t.shape != (K,)):
        raise ValueError(f"sampler.half_grid must be None or a Grid of the {K} midpoint levels of the grid's steps "
                         f"(kdpm2_half_grid), got {type(half_grid).__name__}"
                         + (f" of {half_grid.t.shape[0]} levels" if isinstance(half_grid, Grid) else ""))
    if half_grid is not None:
        _check_midpoints(grid, half_grid, ancestral)


def _kdpm2(denoiser, grid, x_T, key, half_grid, ancestral: bool, s_noise: float, return_trajectory: bool):
    x_T = check_grid(grid, x_T)
    check_bool(return_trajectory=return_trajectory)
    K = grid.num_steps
    check_half_grid(grid, half_grid, ancestral)
    s = grid.sigma_ve
    if half_grid is None:
        level_of_s, half = interpolated_level(grid), (jnp.zeros((K,)),) * 3
    else:
        level_of_s, half = None, (half_grid.t, half_grid.alpha, half_grid.sigma)
    deriv = ode_derivative(denoiser)
    xs = (jnp.arange(K), grid.t[:-1], grid.alpha[:-1], grid.sigma[:-1], s[:-1], grid.alpha[1:], s[1:], half)

    def step(y, inp):
        i, t, a, sg, s_cur, a_n, s_next, (t_h, a_h, sg_h) = inp
        s_up, s_down = ancestral_levels(s_cur, s_next) if ancestral else (0.0, s_next)
        d, _ = deriv(y, t, a, sg)

        def midpoint(y):
            if level_of_s is None:
                lvl = (t_h, a_h, sg_h)
            else:                                    # safe where the step goes to 0 (this branch is not taken)
                lvl = level_of_s(jnp.sqrt(s_cur * jnp.where(s_down > 0, s_down, s_cur)))
            s_mid = lvl[2] / lvl[1]
            d_mid, _ = deriv(y + (s_mid - s_cur) * d, *lvl)
            y_next = y + (s_down - s_cur) * d_mid
            if ancestral:
                y_next = y_next + s_noise * s_up * jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
            return y_next.astype(y.dtype)

        y_next = jax.lax.cond(s_down > 0, midpoint, lambda y: (y + (s_down - s_cur) * d).astype(y.dtype), y)
        return y_next, (a_n * y_next if return_trajectory else None)

    y, xs_out = jax.lax.scan(step, (x_T / grid.alpha[0]).astype(x_T.dtype), xs)
    nfe = K + noisy_targets(grid)
    return grid.alpha[-1] * y, {"nfe": nfe, **with_trajectory(x_T, xs_out, return_trajectory)}


def kdpm2(denoiser, grid: Grid, x_T, key=None, *, half_grid: Grid | None = None, return_trajectory: bool = False):
    """KDPM2 (module doc; diffusers' KDPM2DiscreteScheduler) over the K steps of `grid` from x_T (VP coordinates).
    half_grid: kdpm2_half_grid(process, grid), or None to interpolate the midpoints between the grid's levels.
    key is unused. Returns (x_0, {"nfe", "trajectory" if asked}); trajectory[i] is the sample at level i."""
    return _kdpm2(denoiser, grid, x_T, key, half_grid, False, 1.0, return_trajectory)


def kdpm2_ancestral(denoiser, grid: Grid, x_T, key=None, *, half_grid: Grid | None = None, s_noise: float = 1.0,
                    return_trajectory: bool = False):
    """KDPM2 ancestral (module doc; diffusers' KDPM2AncestralDiscreteScheduler at s_noise = 1). half_grid: the
    ancestral midpoints, kdpm2_half_grid(process, grid, ancestral=True), or None. Noise of step i: fold_in(key, i)."""
    s_noise = check_number("s_noise", s_noise)
    check_key(key, "kdpm2_ancestral")
    return _kdpm2(denoiser, grid, x_T, key, half_grid, True, s_noise, return_trajectory)
