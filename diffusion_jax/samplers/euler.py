"""Euler, Heun and EDM's stochastic sampler on the probability-flow ODE, and Euler ancestral.

Coordinates (Karras et al. 2022, "EDM", eq. 4 with s(t) = 1 / alpha): y = x / alpha, s = sigma / alpha, so that
y = x0 + s eps at every level of a `Grid` and the PF-ODE of every schedule is (EDM eq. 3, sigma(t) = t)

    dy/ds = (y - D(y; s)) / s = eps_hat                                   (`wrapper.ode_derivative`)

    Euler            y_{i+1} = y_i + (s_{i+1} - s_i) d_i                         (EDM Alg. 1, lines 4-5)
    Heun             then, if s_{i+1} != 0:  y_{i+1} = y_i + (s_{i+1} - s_i)(d_i + d'_{i+1}) / 2   (Alg. 1, 6-8)
                     so K steps to s = 0 cost 2K - 1 denoiser calls
    EDM stochastic   gamma_i = min(S_churn / K, sqrt(2) - 1) if S_tmin <= s_i <= S_tmax else 0    (Alg. 2, line 4)
                     s_hat = (1 + gamma_i) s_i,  y_hat = y_i + sqrt(s_hat^2 - s_i^2) S_noise z     (lines 5-6)
                     then the Heun step from (y_hat, s_hat) to s_{i+1}                             (lines 7-11)
    Euler ancestral  sigma_up = min(s_{i+1}, eta sqrt(s_{i+1}^2 (s_i^2 - s_{i+1}^2) / s_i^2)),
                     sigma_down = sqrt(s_{i+1}^2 - sigma_up^2),
                     y_{i+1} = y_i + (sigma_down - s_i) d_i + S_noise sigma_up z
                     (diffusers' EulerAncestralDiscreteScheduler = eta 1; k-diffusion's get_ancestral_step)

The carry is y; levels, trajectory and result are in the grid's (VP) coordinates x_i = alpha_i y_i.
diffusers' Euler / Heun schedulers work on x_ve = y (their scale_model_input divides by sqrt(s^2 + 1) = 1 / alpha).
Their Euler `s_churn` differs from EDM Alg. 2: it evaluates the model *before* adding the churn noise.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.checks import check_bool, check_key, check_number
from diffusion_jax.samplers.grid import Grid, concrete_or_none
from diffusion_jax.samplers.wrapper import ode_derivative


# ------------------------------------------------------------------------------------------- shared helpers
def check_grid(grid, x_T):
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a samplers.grid.Grid, got {type(grid).__name__}")
    if grid.num_steps < 1:
        raise ValueError("grid must have at least 2 levels (one step)")
    x_T = jnp.asarray(x_T)
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"x_T must be a float array, got {x_T.dtype}")
    return x_T


def noisy_targets(grid) -> int:
    """Number of steps i whose target level i + 1 is noisy (sigma > 0): second-order corrections run there.
    A traced grid (a jit argument) is assumed to follow the Grid convention: only the last level is clean."""
    sigma = concrete_or_none(grid.sigma)
    return grid.num_steps - 1 if sigma is None else int(np.count_nonzero(sigma[1:] > 0))


def with_trajectory(x_T, xs, return_trajectory: bool):
    return {"trajectory": jnp.concatenate([x_T[None].astype(xs.dtype), xs])} if return_trajectory else {}


def interpolated_level(grid):
    """s -> (t, alpha, sigma) of an off-grid level (EDM Alg. 2's s_hat): t interpolated linearly in log s between the
    grid's levels and clamped to its range (diffusers' / k-diffusion's _sigma_to_t); alpha = 1 on a VE grid (all
    alpha = 1), else the VP value 1 / sqrt(1 + s^2). Pass your own `level_of_s` for exact times or sub-VP."""
    s = grid.sigma_ve[::-1]                                     # increasing; a clean end maps to log(1e-30)
    log_s, t = jnp.log(jnp.maximum(s, 1e-30)), grid.t[::-1]
    ve = jnp.all(grid.alpha == 1.0)

    def level(s_hat):
        alpha = jnp.where(ve, 1.0, jax.lax.rsqrt(1.0 + s_hat ** 2))
        return jnp.interp(jnp.log(s_hat), log_s, t), alpha, s_hat * alpha
    return level


# ---------------------------------------------------------------------------------------------- solvers
def edm_sampler(denoiser, grid: Grid, x_T, key=None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0, second_order: bool = True,
                level_of_s=None, return_trajectory: bool = False):
    """EDM Algorithm 2 (Algorithm 1 when s_churn = 0) over the K steps of `grid`, from x_T (VP coordinates).

    second_order=False drops the Heun correction (Euler, with churn if asked). s_tmin / s_tmax compare with
    s = sigma / alpha. level_of_s(s_hat) -> (t, alpha, sigma) places the churned level (see `interpolated_level`).
    Noise of step i: jax.random.fold_in(key, i). Returns (x_0, {"nfe", "trajectory" if asked}).
    """
    x_T = check_grid(grid, x_T)
    s_churn = check_number("s_churn", s_churn)
    s_tmin = check_number("s_tmin", s_tmin, allow_inf=True)
    s_tmax = check_number("s_tmax", s_tmax, allow_inf=True)
    s_noise = check_number("s_noise", s_noise)
    check_bool(second_order=second_order, return_trajectory=return_trajectory)
    if level_of_s is not None and not callable(level_of_s):
        raise ValueError("sampler.level_of_s must be None or a callable s -> (t, alpha, sigma)")
    churn = s_churn > 0
    if churn:
        check_key(key, "s_churn > 0")
        level_of_s = level_of_s or interpolated_level(grid)
    K = grid.num_steps
    gamma_max = min(s_churn / K, math.sqrt(2.0) - 1.0)
    deriv = ode_derivative(denoiser)
    s = grid.sigma_ve
    xs = (jnp.arange(K), grid.t[:-1], grid.alpha[:-1], grid.sigma[:-1], s[:-1],
          grid.t[1:], grid.alpha[1:], grid.sigma[1:], s[1:])

    def step(y, inp):
        i, t, a, sg, s_cur, t_n, a_n, sg_n, s_next = inp
        if churn:
            gamma = jnp.where((s_cur >= s_tmin) & (s_cur <= s_tmax), gamma_max, 0.0)        # Alg. 2, line 4
            s_hat = (1.0 + gamma) * s_cur                                                   # line 5
            z = jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
            # line 6; sqrt(s_hat^2 - s_i^2) written without cancellation (exactly 0 at gamma = 0)
            y = y + s_cur * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * z
            t, a, sg = (jnp.where(gamma > 0, u, v) for u, v in zip(level_of_s(s_hat), (t, a, sg)))
            s_cur = jnp.where(gamma > 0, s_hat, s_cur)
        d, _ = deriv(y, t, a, sg)                                                           # line 7
        y_next = y + (s_next - s_cur) * d                                                   # line 8
        if second_order:
            def correct(y_next):                                                            # lines 9-11
                d_next, _ = deriv(y_next, t_n, a_n, sg_n)
                return y + (s_next - s_cur) * (0.5 * d + 0.5 * d_next)
            y_next = jax.lax.cond(s_next > 0, correct, lambda v: v, y_next)
        y_next = y_next.astype(y.dtype)
        return y_next, (a_n * y_next if return_trajectory else None)

    y, xs_out = jax.lax.scan(step, (x_T / grid.alpha[0]).astype(x_T.dtype), xs)
    nfe = K + (noisy_targets(grid) if second_order else 0)
    return grid.alpha[-1] * y, {"nfe": nfe, **with_trajectory(x_T, xs_out, return_trajectory)}


def euler(denoiser, grid: Grid, x_T, key=None, *, return_trajectory: bool = False):
    """Euler on the PF-ODE in (y, s) (diffusers' EulerDiscreteScheduler, s_churn = 0). NFE = K. key is unused."""
    return edm_sampler(denoiser, grid, x_T, key, second_order=False, return_trajectory=return_trajectory)


def heun(denoiser, grid: Grid, x_T, key=None, *, return_trajectory: bool = False):
    """Heun = EDM Algorithm 1 (diffusers' HeunDiscreteScheduler). NFE = 2K - 1 on a grid ending at sigma = 0."""
    return edm_sampler(denoiser, grid, x_T, key, second_order=True, return_trajectory=return_trajectory)


def euler_ancestral(denoiser, grid: Grid, x_T, key=None, *, eta: float = 1.0, s_noise: float = 1.0,
                    return_trajectory: bool = False):
    """Euler ancestral (module doc). eta = 1 is diffusers' EulerAncestralDiscreteScheduler, eta = 0 plain Euler.
    Noise of step i: jax.random.fold_in(key, i) (drawn in y = x / alpha). NFE = K."""
    x_T = check_grid(grid, x_T)
    eta, s_noise = check_number("eta", eta), check_number("s_noise", s_noise)
    if eta > 0:
        check_key(key, "euler_ancestral with eta > 0")
    K, deriv, s = grid.num_steps, ode_derivative(denoiser), grid.sigma_ve
    xs = (jnp.arange(K), grid.t[:-1], grid.alpha[:-1], grid.sigma[:-1], s[:-1], grid.alpha[1:], s[1:])

    def step(y, inp):
        i, t, a, sg, s_cur, a_n, s_next = inp
        d, _ = deriv(y, t, a, sg)
        s_up = jnp.minimum(s_next, eta * s_next * jnp.sqrt(jnp.maximum(1.0 - (s_next / s_cur) ** 2, 0.0)))
        s_down = jnp.sqrt(jnp.maximum(s_next ** 2 - s_up ** 2, 0.0))
        y_next = y + (s_down - s_cur) * d
        if eta > 0:
            y_next = y_next + s_noise * s_up * jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
        y_next = y_next.astype(y.dtype)
        return y_next, (a_n * y_next if return_trajectory else None)

    y, xs_out = jax.lax.scan(step, (x_T / grid.alpha[0]).astype(x_T.dtype), xs)
    return grid.alpha[-1] * y, {"nfe": K, **with_trajectory(x_T, xs_out, return_trajectory)}
