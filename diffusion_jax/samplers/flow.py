"""ODE solvers on the velocity of flow matching (Lipman et al. 2023; Liu et al. 2023), diffusers' FlowMatch schedulers.

Any process x = alpha x_0 + sigma eps, in the coordinates of the linear interpolant

    tau = sigma / (alpha + sigma),   z = x / (alpha + sigma) = (1 - tau) x_0 + tau eps,   dz / dtau = v = eps - x_0,

has the probability-flow ODE dz/dtau = v_hat(z, tau) = eps_hat - x0_hat (the denoiser's pair). For the rectified flow
(`process.flow`: alpha + sigma = 1) tau = sigma and z = x: these are diffusers' FlowMatch steps on the model's velocity;
on other processes they are the same ODE in straight-path coordinates (tau in [0, 1] stays finite where x / alpha of
EDM's coordinates does not: at sigma = 1 of a flow). With h = tau_{i+1} - tau_i:

    flow_euler      z_{i+1} = z_i + h v_i                                  (FlowMatchEulerDiscreteScheduler)
                    stochastic: z_{i+1} = (1 - tau_{i+1}) x0_hat + tau_{i+1} w, w fresh noise from fold_in(key, i)
                    (FlowMatchEuler's stochastic_sampling: the noise drawn afresh at every level, as LCM's)
    flow_heun       z_e = z_i + h v_i;  z_{i+1} = z_i + h (v_i + v(z_e, tau_{i+1})) / 2; an Euler step to tau = 0
                    (FlowMatchHeunDiscreteScheduler; NFE 2K - 1)
    flow_midpoint   z_m = z_i + h / 2 v_i;  z_{i+1} = z_i + h v(z_m, (tau_i + tau_{i+1}) / 2)   (NFE 2K)

flow_midpoint's half levels come from the process (`flow_half_grid`, the registry's `from_process`); without them
t and alpha + sigma are taken halfway between the grid's levels (exact for the rectified flow's scales). Result and
trajectory in the grid's coordinates (x).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.checks import check_bool, check_key
from diffusion_jax.samplers.euler import check_grid, noisy_targets, with_trajectory
from diffusion_jax.samplers.grid import Grid, concrete_or_none, levels_of_s


def _velocity(denoiser):
    """v(z, level) = eps_hat - x0_hat at x = (alpha + sigma) z (module doc), with x0_hat."""
    def v(z, t, alpha, sigma):
        x0, eps = denoiser((alpha + sigma) * z, t, alpha, sigma)
        return eps - x0, x0
    return v


def _run(grid, x_T, step, return_trajectory, nfe, *extra_xs):
    """Scan `step(z, inp) -> z_next` over the K steps, inp = (i, level_i, level_{i+1}, tau_i, tau_{i+1}, *extra)."""
    scale = grid.alpha + grid.sigma
    tau = grid.sigma / scale
    level = (grid.t, grid.alpha, grid.sigma)
    xs = (jnp.arange(grid.num_steps), tuple(a[:-1] for a in level), tuple(a[1:] for a in level), tau[:-1], tau[1:],
          scale[1:], *extra_xs)

    def body(z, inp):
        z_next = step(z, inp).astype(z.dtype)
        return z_next, (inp[5] * z_next if return_trajectory else None)

    z, xs_out = jax.lax.scan(body, (x_T / scale[0]).astype(x_T.dtype), xs)
    return scale[-1] * z, {"nfe": nfe, **with_trajectory(x_T, xs_out, return_trajectory)}


def flow_euler(denoiser, grid: Grid, x_T, key=None, *, stochastic: bool = False, return_trajectory: bool = False):
    """Euler on dz/dtau = v (module doc; diffusers' FlowMatchEulerDiscreteScheduler), or its stochastic_sampling
    (fresh noise of step i from fold_in(key, i)). Returns (x_0, {"nfe": K, "trajectory" if asked})."""
    x_T = check_grid(grid, x_T)
    check_bool(stochastic=stochastic, return_trajectory=return_trajectory)
    if stochastic:
        check_key(key, "flow_euler with stochastic=True")
    v = _velocity(denoiser)

    def step(z, inp):
        i, lvl, _, tau, tau_next = inp[:5]
        vel, x0 = v(z, *lvl)
        if stochastic:
            w = jax.random.normal(jax.random.fold_in(key, i), z.shape, z.dtype)
            return (1.0 - tau_next) * x0 + tau_next * w
        return z + (tau_next - tau) * vel

    return _run(grid, x_T, step, return_trajectory, grid.num_steps)


def flow_heun(denoiser, grid: Grid, x_T, key=None, *, return_trajectory: bool = False):
    """Heun on dz/dtau = v (module doc; diffusers' FlowMatchHeunDiscreteScheduler). key is unused.
    Returns (x_0, {"nfe": K + steps with a noisy target, "trajectory" if asked})."""
    x_T = check_grid(grid, x_T)
    check_bool(return_trajectory=return_trajectory)
    v = _velocity(denoiser)

    def step(z, inp):
        _, lvl, lvl_next, tau, tau_next = inp[:5]
        h = tau_next - tau
        vel, _ = v(z, *lvl)
        z_e = z + h * vel

        def correct(z_e):
            return z + 0.5 * h * (vel + v(z_e, *lvl_next)[0])

        return jax.lax.cond(tau_next > 0, correct, lambda z_e: z_e, z_e)

    return _run(grid, x_T, step, return_trajectory, grid.num_steps + noisy_targets(grid))


def flow_half_grid(process, grid: Grid) -> Grid:
    """The K levels at tau_mid = (tau_i + tau_{i+1}) / 2 of `grid`'s steps on `process` (s = tau / (1 - tau))."""
    alpha, sigma = (np.asarray(v, np.float64) for v in (grid.alpha, grid.sigma))
    tau = sigma / (alpha + sigma)
    tau_mid = 0.5 * (tau[:-1] + tau[1:])
    t, a, sg = levels_of_s(process, tau_mid / (1.0 - tau_mid))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return Grid(t=f32(t), alpha=f32(a), sigma=f32(sg))


def flow_midpoint_options(process, grid: Grid | None) -> dict:
    """The registry's `from_process` for 'flow_midpoint': {"half_grid": flow_half_grid(process, grid)}."""
    if grid is None:
        raise ValueError("sampler 'flow_midpoint' places its midpoints on the process and needs a concrete grid: "
                         "close over the schedule instead of passing it as a jit argument")
    return {"half_grid": flow_half_grid(process, grid)}


def flow_midpoint(denoiser, grid: Grid, x_T, key=None, *, half_grid: Grid | None = None,
                  return_trajectory: bool = False):
    """The explicit midpoint method on dz/dtau = v (module doc). half_grid: flow_half_grid(process, grid), or None to
    take the half levels halfway between the grid's (module doc). Returns (x_0, {"nfe": 2K, "trajectory" if asked})."""
    x_T = check_grid(grid, x_T)
    check_bool(return_trajectory=return_trajectory)
    K = grid.num_steps
    if half_grid is not None and (not isinstance(half_grid, Grid) or half_grid.t.shape != (K,)):
        raise ValueError(f"sampler.half_grid must be None or a Grid of the {K} half levels (flow_half_grid)")
    vals = [] if half_grid is None else [concrete_or_none(a) for a in (grid.alpha, grid.sigma, half_grid.alpha,
                                                                        half_grid.sigma)]
    if vals and all(v is not None for v in vals):        # a concrete half_grid must hold this grid's midpoints
        a, sg, a_h, sg_h = (np.asarray(v, np.float64) for v in vals)
        tau, tau_h = sg / (a + sg), sg_h / (a_h + sg_h)
        if not np.allclose(tau_h, 0.5 * (tau[:-1] + tau[1:]), rtol=1e-3, atol=1e-6):
            raise ValueError("sampler.half_grid does not hold the midpoints of this grid's steps in tau; build it "
                             "with flow_half_grid(process, grid)")
    half = (jnp.zeros((K,)),) * 3 if half_grid is None else (half_grid.t, half_grid.alpha, half_grid.sigma)
    v = _velocity(denoiser)

    def step(z, inp):
        _, lvl, lvl_next, tau, tau_next, _, lvl_h = inp
        h = tau_next - tau
        if half_grid is None:   # t and alpha + sigma halfway (exact on the rectified flow: alpha + sigma = 1)
            tau_m, scale = 0.5 * (tau + tau_next), 0.5 * (lvl[1] + lvl[2] + lvl_next[1] + lvl_next[2])
            lvl_h = (0.5 * (lvl[0] + lvl_next[0]), scale * (1.0 - tau_m), scale * tau_m)
        return z + h * v(z + 0.5 * h * v(z, *lvl)[0], *lvl_h)[0]

    return _run(grid, x_T, step, return_trajectory, 2 * K, half)
