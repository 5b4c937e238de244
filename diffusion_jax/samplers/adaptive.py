"""Adaptive probability-flow ODE solve with diffrax (Tsit5 / Dopri5 and a PID step-size controller).

In EDM / VE coordinates y = x / alpha, s = sigma / alpha every schedule's probability-flow ODE (Song et al. 2021,
eq. 13) is dy/ds = (y - x0_hat) / s = eps_hat (Karras et al. 2022, eq. 1 with sigma(t) = t and the score of
eq. 3). We integrate it in lambda = -log s = log(alpha / sigma) (DPM-Solver's lambda, increasing from the noisiest
level), where it reads

    dy/dlambda = -s eps_hat(alpha y; t, alpha, sigma),        s = exp(-lambda),

from the grid's first level s_0 = sigma_0 / alpha_0 to s_min = `sigma_min` (in these VE units; default: the grid's
smallest positive noise level, i.e. the schedule's t_min, below which a network was never trained), then jump
to the data with one more evaluation, x0 = x0_hat(y(s_min); s_min) (Tweedie; the DDIM step from s_min to 0, error
O(s_min^2) on the ODE's end point). The whole batch is one ODE state: one step size, error in diffrax's RMS norm.

The level (network time t, alpha, sigma) at an arbitrary s comes from `sde` (a schedule of `diffusion_jax.process.sde`:
t = sde.t_of_log_snr(-2 log s), exact) or, without it, from the grid: t and log alpha interpolated linearly in
log s between the grid's levels (exact on them; diffusers' `_sigma_to_t` rule for fractional DDPM timesteps, so
a grid of all T timesteps gives a discrete schedule's own interpolation), sigma = s alpha.

NFE. Tsit5 and Dopri5 have 7 stages with first-same-as-last: each attempted step (accepted or rejected) costs 6
evaluations, plus 1 at the start (diffrax 0.7 selects the first step size, with dt0=None, without evaluating):
nfe = 6 num_steps + 1 + 1 (the final jump), a traced int32 from diffrax's stats. Compiles inside jit with
throw=False (no host callback): info["success"] is False where max_steps was reached.
"""
from __future__ import annotations

import math

import diffrax
import jax.numpy as jnp

from diffusion_jax.samplers.checks import check_bool, check_choice, check_int, check_number
from diffusion_jax.samplers.grid import check_levels, concrete_or_none

ODE_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
EVALS_PER_STEP = {"tsit5": 6, "dopri5": 6}


def _check(grid, x_T, solver, rtol, atol, sigma_min, sde, max_steps, dt0, return_trajectory):
    check_choice("solver", solver, ODE_SOLVERS)
    check_number("rtol", rtol, strict=True)
    check_number("atol", atol)
    if sigma_min is not None:
        check_number("sigma_min", sigma_min, strict=True)
    if dt0 is not None:
        check_number("dt0", dt0, strict=True)
    check_int("max_steps", max_steps, minimum=1)
    check_bool(return_trajectory=return_trajectory)
    check_levels(grid, x_T, 1, sde, ("alpha", "t_of_log_snr", "network_time"))
    s = concrete_or_none(grid.sigma / grid.alpha)
    if s is not None and sigma_min is not None:
        lo = s[s > 0].min() if sde is None else 0.0
        if not lo <= sigma_min < s[0]:
            raise ValueError(f"sampler.sigma_min={sigma_min} must lie in [{lo:.4g}, {s[0]:.4g}) (sigma / alpha of the "
                             f"grid's levels{'' if sde is None else '; below 0 with sde'}), the range it can reach")


def level_fn(grid, sde=None):
    """s -> (t, alpha, sigma) of the noise level with sigma / alpha = s (module doc)."""
    if sde is not None:
        def level_sde(s):
            t = sde.t_of_log_snr(-2.0 * jnp.log(s))
            alpha = sde.alpha(t)
            return sde.network_time(t), alpha, s * alpha
        return level_sde
    pos = grid.sigma > 0
    s = jnp.where(pos, grid.sigma, 1.0) / grid.alpha
    log_s = jnp.log(s)[::-1]                                     # ascending (noisiest level first on the grid)
    lo = jnp.min(jnp.where(pos, jnp.log(s), jnp.inf))
    # clean levels (sigma = 0, at the end of the grid) are put below the smallest level and copy its values
    m = jnp.sum(~pos)
    xp = jnp.where(pos[::-1], log_s, lo - (m - jnp.arange(pos.shape[0])).astype(log_s.dtype))
    last = jnp.argmin(jnp.where(pos, jnp.log(s), jnp.inf))       # index of the smallest positive level
    t_fp = jnp.where(pos, grid.t, grid.t[last])[::-1]
    la_fp = jnp.where(pos, jnp.log(grid.alpha), jnp.log(grid.alpha[last]))[::-1]

    def level_grid(s):
        u = jnp.clip(jnp.log(s), lo, log_s[-1])
        alpha = jnp.exp(jnp.interp(u, xp, la_fp))
        return jnp.interp(u, xp, t_fp), alpha, s * alpha
    return level_grid


def adaptive_ode(denoiser, grid, x_T, key=None, *, solver: str = "tsit5", rtol: float = 1e-3, atol: float = 1e-3,
                 sigma_min: float | None = None, sde=None, max_steps: int = 4096, dt0: float | None = None,
                 return_trajectory: bool = False):
    """Adaptive PF-ODE solve (module doc); key is unused (deterministic). Returns (x_0, info) with info["nfe"]
    (traced int32), "num_steps", "num_accepted_steps", "success" and, if asked, "trajectory" (K + 1, B, ...): x at
    the grid's levels (levels below sigma_min at sigma_min), the last replaced by x_0 where it is the clean end."""
    _check(grid, x_T, solver, rtol, atol, sigma_min, sde, max_steps, dt0, return_trajectory)
    x_T = jnp.asarray(x_T)
    dtype = x_T.dtype
    level = level_fn(grid, sde)
    pos = grid.sigma > 0
    lam = jnp.where(pos, jnp.log(grid.alpha) - jnp.log(jnp.where(pos, grid.sigma, 1.0)), jnp.inf)
    lam0 = lam[0]
    lam1 = jnp.max(jnp.where(pos, lam, -jnp.inf)) if sigma_min is None else -math.log(sigma_min)
    lam1 = jnp.asarray(lam1, dtype)

    def field(lmb, y, args):                                     # dy/dlambda = -s eps_hat
        s = jnp.exp(-lmb)
        t, alpha, sigma = level(s)
        _, eps = denoiser((alpha * y).astype(dtype), t, alpha, sigma)
        return (-s * eps).astype(y.dtype)

    saveat = (diffrax.SaveAt(ts=jnp.clip(lam, lam0, lam1), t1=True) if return_trajectory
              else diffrax.SaveAt(t1=True))
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), ODE_SOLVERS[solver](), t0=lam0, t1=lam1, dt0=dt0, y0=x_T / grid.alpha[0],
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps, throw=False,
        saveat=saveat)
    s1 = jnp.exp(-lam1)
    t1, alpha1, sigma1 = level(s1)
    y1 = sol.ys[-1]
    x0 = denoiser((alpha1 * y1).astype(dtype), t1, alpha1, sigma1)[0].astype(dtype)
    n = sol.stats["num_steps"]
    info = {"nfe": EVALS_PER_STEP[solver] * n + 2, "num_steps": n,
            "num_accepted_steps": sol.stats["num_accepted_steps"],
            "success": sol.result == diffrax.RESULTS.successful}
    if return_trajectory:
        shape = (-1,) + (1,) * x_T.ndim
        a_lv = jnp.where(lam <= lam1, grid.alpha, alpha1).reshape(shape)
        traj = (a_lv * sol.ys[:-1]).astype(dtype)
        info["trajectory"] = jnp.where((~pos).reshape(shape), x0[None], traj)
    return x0, info
