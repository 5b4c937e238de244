"""DDIM inversion: the deterministic DDIM update run backwards, data x_0 -> noise x_T (as diffusers'
DDIMInverseScheduler; Song et al. 2021 sec. 4.3 / eq. 13, Dhariwal & Nichol 2021 app. F, Mokady et al. 2023).

DDIM with eta = 0 is Euler on the PF-ODE in y = x / alpha, s = sigma / alpha (DDIM eq. 13). Inversion walks the same
grid from its last level (the clean end, or the least noisy level) to its first, one step a -> b (s_b > s_a) as

    (x0_hat, eps_hat) = denoiser at level a,      x_b = alpha_b x0_hat + sigma_b eps_hat     (DDIM eq. 12, eta = 0)

model_time="next" (default; diffusers, and the null-text-inversion code of Mokady et al.): the network is given the
*target* time t_b with the current x_a; x0_hat / eps_hat are formed with (alpha_a, sigma_a). This starts cleanly at
sigma_a = 0 (eps- and v-prediction: x0_hat = x, eps_hat = the output) but is only approximately the reverse of DDIM.
model_time="current": the explicit Euler step, the network at t_a. At a clean level (sigma_a = 0) no call is made:
the limit D(y; 0) = y gives eps_hat = 0, x0_hat = x / alpha_a.
Each version converges to the exact PF-ODE map as the steps shrink, so inversion then DDIM sampling returns x_0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers.euler import check_grid, noisy_targets, with_trajectory
from diffusion_jax.samplers.grid import Grid

MODEL_TIMES = ("next", "current")


def ddim_inversion(denoiser, grid: Grid, x_0, key=None, *, model_time: str = "next", return_trajectory: bool = False):
    """Invert x_0 (at the grid's last level, VP coordinates) to the grid's first level. key is unused.

    Returns (x_T, {"nfe", "trajectory" (K+1, ...) in the order visited, x_0 first, if asked}).
    """
    x_0 = check_grid(grid, x_0)
    if model_time not in MODEL_TIMES:
        raise ValueError(f"sampler.model_time={model_time!r} is unknown; choose from {MODEL_TIMES}")
    K = grid.num_steps
    rev = lambda v: v[::-1]
    xs = (rev(grid.t[1:]), rev(grid.alpha[1:]), rev(grid.sigma[1:]),        # source a = K, ..., 1
          rev(grid.t[:-1]), rev(grid.alpha[:-1]), rev(grid.sigma[:-1]))     # target b = K - 1, ..., 0

    def step(x, inp):
        t_a, a_a, s_a, t_b, a_b, s_b = inp
        if model_time == "next":
            x0, eps = denoiser(x, t_b, a_a, s_a)
        else:
            x0, eps = jax.lax.cond(s_a > 0, lambda x: denoiser(x, t_a, a_a, s_a),
                                   lambda x: (x / a_a, jnp.zeros_like(x)), x)
        x_b = (a_b * x0 + s_b * eps).astype(x.dtype)                                    # DDIM eq. 12, eta = 0
        return x_b, (x_b if return_trajectory else None)

    x_T, xs_out = jax.lax.scan(step, x_0, xs)
    nfe = K if model_time == "next" else noisy_targets(grid)      # sources = levels 1..K; a clean one is free
    return x_T, {"nfe": nfe, **with_trajectory(x_0, xs_out, return_trajectory)}
