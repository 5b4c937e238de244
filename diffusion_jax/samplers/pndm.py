"""PNDM / PLMS: pseudo numerical methods for diffusion models (Liu et al. 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds"), as diffusers' PNDMScheduler.

The "transfer part" moves x from level a to level b along the DDIM update for a given noise estimate e
(PNDM eq. 9 as diffusers cites it; algebraically DDIM eq. 12 with eta = 0):

    phi(x, e, a -> b) = alpha_b (x - sigma_a e) / alpha_a + sigma_b e
                      = sqrt(abar_b / abar_a) x
                        - (abar_b - abar_a) e / (abar_a sqrt(1 - abar_b) + sqrt(abar_a (1 - abar_a) abar_b))

and the "gradient part" replaces e by a higher-order combination of eps_hat evaluations:

    pseudo linear multi-step (PLMS)   e' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24,
                                      with the Adams-Bashforth orders 1-3, (3 e_i - e_{i-1}) / 2 and
                                      (23 e_i - 16 e_{i-1} + 5 e_{i-2}) / 12, while fewer values are stored (diffusers)
    warm-up "plms" (diffusers' skip_prk_steps=True: one pseudo improved Euler step):
                                      e_1 = eps(x_a), x' = phi(x_a, e_1, a -> b), e' = (e_1 + eps(x'_b)) / 2
    warm-up "prk" (diffusers' default: three pseudo Runge-Kutta steps through the half level h between a and b):
                                      e_1 = eps(x_a);        x^1 = phi(x, e_1, a -> h)
                                      e_2 = eps(x^1_h);      x^2 = phi(x, e_2, a -> h)
                                      e_3 = eps(x^2_h);      x^3 = phi(x, e_3, a -> b)
                                      e_4 = eps(x^3_b);      e' = (e_1 + 2 e_2 + 2 e_3 + e_4) / 6

Only the e_1 of each step (eps at the level itself) enters the multi-step history. NFE: K + 1 ("plms", K >= 2),
K + 9 ("prk"). The combination is over eps_hat; diffusers combines raw model outputs, which differs for
v-prediction (its v -> eps conversion uses the current level's alpha, sigma for all stored outputs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.checks import check_bool, check_choice
from diffusion_jax.samplers.euler import check_grid, with_trajectory
from diffusion_jax.samplers.grid import Grid

WARMUPS = ("plms", "prk")
# Adams-Bashforth weights for [e_i, e_{i-1}, e_{i-2}, e_{i-3}], order 1..4
_AB = np.array([[1, 0, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0],
                [55 / 24, -59 / 24, 37 / 24, -9 / 24]])


def transfer(x, e, a, b):
    """phi(x, e, a -> b) with a, b = (alpha, sigma) pairs (module doc)."""
    (alpha_a, sigma_a), (alpha_b, sigma_b) = a, b
    return alpha_b * (x - sigma_a * e) / alpha_a + sigma_b * e


def prk_options(process, grid: Grid | None) -> dict:
    """The registry's `from_process` for 'pndm': {"half_grid": prk_half_grid(process, grid)}. The half levels need a
    discrete process and a concrete grid (not a jit argument)."""
    if not process.discrete or grid is None:
        raise ValueError("sampler 'pndm' (PRK warm-up) needs a concrete discrete schedule (not a jit argument); "
                         "use 'plms' otherwise")
    return {"half_grid": prk_half_grid(process, grid)}


def prk_half_grid(schedule, grid: Grid, num: int = 3) -> Grid:
    """The half levels t_h = t_i - floor((t_i - t_{i+1}) / 2) of the first `num` steps of an integer-timestep grid on a
    discrete schedule (anything with `alphas_cumprod` (T,)): diffusers' t - (T // N) // 2 for its spacings."""
    t = np.asarray(grid.t, np.float64)
    if grid.num_steps <= num or np.any(t[1:num + 1] < 0):
        raise ValueError(f"sampler.steps: 'pndm' (PRK warm-up) needs at least {num + 1} steps, got {grid.num_steps}; "
                         "use 'plms' for fewer")
    if np.any(t[:num + 1] != np.round(t[:num + 1])):
        raise ValueError("sampler.spacing: 'pndm' (PRK warm-up) needs a grid of integer timesteps "
                         "(spacing 'leading', 'trailing' or 'linspace'); use 'plms' otherwise")
    t_half = t[:num] - np.floor((t[:num] - t[1:num + 1]) / 2)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[t_half.astype(np.int64)]
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return Grid(t=f32(t_half), alpha=f32(np.sqrt(abar)), sigma=f32(np.sqrt(1.0 - abar)))


def pndm(denoiser, grid: Grid, x_T, key=None, *, warmup: str = "plms", half_grid: Grid | None = None,
         return_trajectory: bool = False):
    """PNDM over the K steps of `grid` from x_T (module doc). warmup="prk" needs K >= 4 and `half_grid`, the half
    levels of the first 3 steps (`prk_half_grid(schedule, grid)`). key is unused (deterministic).
    Returns (x_0, {"nfe", "trajectory" if asked})."""
    x_T = check_grid(grid, x_T)
    K = grid.num_steps
    check_choice("warmup", warmup, WARMUPS)
    check_bool(return_trajectory=return_trajectory)
    if warmup == "prk":
        if not isinstance(half_grid, Grid) or half_grid.t.shape[0] < 3:
            raise ValueError("sampler.half_grid: warmup='prk' needs a Grid of >= 3 half levels (prk_half_grid)")
        if K < 4:
            raise ValueError(f"sampler.steps: warmup='prk' needs at least 4 steps, the grid has {K}")
        n_warm, nfe = 3, K + 9
        pad = lambda v: jnp.concatenate([v[:3], jnp.ones((K - 3,), v.dtype)])
        half = (pad(half_grid.t), pad(half_grid.alpha), pad(half_grid.sigma))
    else:
        n_warm = 1 if K >= 2 else 0          # K = 1: one DDIM step, as diffusers
        nfe = K + n_warm
        half = (jnp.ones((K,)),) * 3
    ab = jnp.asarray(_AB, jnp.float32)

    def eps(x, level):
        t, alpha, sigma = level
        return denoiser(x, t, alpha, sigma)[1]

    def multistep(x, hist, i, cur, nxt, hlf):            # PLMS: Adams-Bashforth on eps, then transfer
        e = eps(x, cur)
        c = ab[jnp.minimum(i, 3)]
        e_comb = c[0] * e + c[1] * hist[0] + c[2] * hist[1] + c[3] * hist[2]
        return transfer(x, e_comb, cur[1:], nxt[1:]), e

    def improved_euler(x, hist, i, cur, nxt, hlf):       # diffusers' skip_prk_steps first step
        e1 = eps(x, cur)
        e2 = eps(transfer(x, e1, cur[1:], nxt[1:]), nxt)
        return transfer(x, 0.5 * (e1 + e2), cur[1:], nxt[1:]), e1

    def runge_kutta(x, hist, i, cur, nxt, hlf):          # pseudo Runge-Kutta (full PNDM warm-up)
        e1 = eps(x, cur)
        e2 = eps(transfer(x, e1, cur[1:], hlf[1:]), hlf)
        e3 = eps(transfer(x, e2, cur[1:], hlf[1:]), hlf)
        e4 = eps(transfer(x, e3, cur[1:], nxt[1:]), nxt)
        return transfer(x, (e1 + 2.0 * e2 + 2.0 * e3 + e4) / 6.0, cur[1:], nxt[1:]), e1

    warm = runge_kutta if warmup == "prk" else improved_euler

    def step(carry, inp):
        x, hist = carry
        i, cur, nxt, hlf = inp
        args = (x, hist, i, cur, nxt, hlf)
        x_next, e = jax.lax.cond(i < n_warm, warm, multistep, *args) if n_warm else multistep(*args)
        x_next = x_next.astype(x.dtype)
        hist = jnp.concatenate([e[None].astype(hist.dtype), hist[:2]])
        return (x_next, hist), (x_next if return_trajectory else None)

    levels = lambda sl: (grid.t[sl], grid.alpha[sl], grid.sigma[sl])
    xs = (jnp.arange(K), levels(slice(None, -1)), levels(slice(1, None)), half)
    (x, _), xs_out = jax.lax.scan(step, (x_T, jnp.zeros((3,) + x_T.shape, x_T.dtype)), xs)
    return x, {"nfe": nfe, **with_trajectory(x_T, xs_out, return_trajectory)}


def plms(denoiser, grid: Grid, x_T, key=None, *, return_trajectory: bool = False):
    """PLMS = pndm(warmup="plms") (diffusers' PNDMScheduler(skip_prk_steps=True)). NFE = K + 1."""
    return pndm(denoiser, grid, x_T, key, warmup="plms", return_trajectory=return_trajectory)
