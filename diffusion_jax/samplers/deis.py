"""DEIS: the diffusion exponential integrator sampler (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with
Exponential Integrator"), multistep "rho AB-DEIS" with the polynomial in log rho, as diffusers' DEISMultistepScheduler
(algorithm_type "deis", solver_type "logrho").

With rho = sigma / alpha (`Grid.sigma_ve`) the probability-flow ODE of x = alpha x0 + sigma eps is exactly
d(x / alpha) / d rho = eps_hat (Zhang & Chen 2023, eq. 14 after the change of variables rho), so that

    x_t = alpha_t (x_s / alpha_s + int_{rho_s}^{rho_t} eps_hat(rho) d rho).

Step i (s = level i, t = level i + 1) replaces eps_hat by its Lagrange polynomial in u = log rho through the last q
outputs m_j = eps_hat at level i - j (nodes u_j = log rho_{i-j}), j < q, and integrates it exactly:

    x_t = alpha_t (x_s / alpha_s + sum_{j<q} c_j m_j),     c_j = F_j(rho_t) - F_j(rho_s),
    F_j(rho) = int l_j(log rho) d rho = rho sum_{n>=0} (-1)^n l_j^(n)(log rho)       (e^u times a polynomial in u)
    q = 1:  F_0 = rho                                        (c_0 = rho_t - rho_s: DDIM, DPM-Solver-1)
    q = 2:  F_j = rho (u - u_k - 1) / (u_j - u_k)
    q = 3:  F_j = rho ((u - u_k)(u - u_l) - (2u - u_k - u_l) + 2) / ((u_j - u_k)(u_j - u_l))

({j, k, l} = {0, 1, 2}; diffusers' ind_fn). We evaluate the same integrals by Gauss-Legendre in v = log(rho / rho_s)
(`deis_coefficients`), better conditioned in float32 than the differences F_j(rho_t) - F_j(rho_s).
Orders as diffusers' step: warm-up q_i = min(order, i + 1); lower_order_final (only when K < 15, as diffusers): q = 1
at the last step and q <= 2 at the one before. diffusers' DEIS grids never reach sigma = 0 (they end at the level of
timestep 0, or repeat the last Karras level); on our grids a step to the clean level (rho_t = 0) is first order,
x_t = alpha_t x0_hat(x_s), whatever the order, as DPM-Solver's final_sigmas_type "zero" (`dpm_solver`).
A zero-length step (rho_t = rho_s) returns x_s.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.checks import check_bool
from diffusion_jax.samplers.dpm_solver import (
    check_common,
    multistep_orders,
    solver_info,
)
from diffusion_jax.samplers.euler import check_grid
from diffusion_jax.samplers.quadrature import lagrange_integrals

_POINTS = 16                 # Gauss-Legendre: error ~1e-22 relative for |log(rho_t / rho_s)| <= 10


def deis_coefficients(u, q, rho_s, rho_t):
    """(c_0, c_1, c_2) of the module doc for nodes u (3,) = log rho_i, log rho_{i-1}, log rho_{i-2} (those past q
    ignored), order q (int or traced), rho_s = exp(u_0) > 0 and rho_t > 0 (rho_t = 0 is left to the caller).

    c_j = rho_s int_0^h l_j(u_0 + v) e^v dv with h = log(rho_t / rho_s): the integrand is entire, so a 16-node
    Gauss-Legendre rule is exact to rounding; in float32 it is better conditioned than F_j(rho_t) - F_j(rho_s)
    (order-3 trajectories on diffusers' grids against float64: <= 7e-6 relative, vs 3.5e-5)."""
    h = jnp.log(rho_t) - u[0]
    # in v = u - u_0 (nodes u_k - u_0 = -delta_k), weight e^v: l_j(u_0 + v) = prod_k (v + delta_k) / (delta_k - delta_j)
    coeffs = list(rho_s * lagrange_integrals(u - u[0], q, 0.0, h, points=_POINTS, weight=jnp.exp))
    coeffs[0] = jnp.where(q == 1, rho_t - rho_s, coeffs[0])       # first order: exactly rho_t - rho_s
    return jnp.stack(coeffs)


def deis(denoiser, grid, x_T, key=None, *, order: int = 2, lower_order_final: bool = True,
         return_trajectory: bool = False):
    """Multistep DEIS (log-rho AB, module doc) of `order` 1-3 on `grid` from x_T (VP coordinates), as diffusers'
    DEISMultistepScheduler(solver_order=order, lower_order_final=...). One network call per step; key is unused.
    Returns (x_0, {"nfe": K[, "trajectory": (K+1, *x.shape)]}): trajectory[i] is the sample at level i."""
    K = check_common(grid, x_T, order, return_trajectory)
    x_T = check_grid(grid, x_T)
    check_bool(lower_order_final=lower_order_final)
    orders = multistep_orders(K, order, lower_order_final, euler_at_final=False)
    i = np.arange(K)
    rho = grid.sigma_ve
    back = np.maximum(i[:, None] - np.arange(3)[None, :], 0)                 # (K, 3) static indices i - j, clamped
    xs = (orders, jnp.log(rho[back]), grid.t[:-1], grid.alpha[:-1], grid.sigma[:-1], rho[:-1],
          grid.alpha[1:], rho[1:])

    def step(carry, inp):
        x, m1, m2 = carry                                      # eps_hat at the previous two levels
        q, u, t, a_s, s_s, rho_s, a_t, rho_t = inp
        x0, eps = denoiser(x, t, a_s, s_s)
        clean, still = rho_t <= 0, rho_t == rho_s
        c = deis_coefficients(u, q, rho_s, jnp.where(clean | still, rho_s, rho_t)).astype(x.dtype)
        x_next = a_t * (x / a_s + c[0] * eps + c[1] * m1 + c[2] * m2)
        x_next = jnp.where(clean, a_t * x0, jnp.where(still, x, x_next)).astype(x.dtype)
        return (x_next, eps.astype(x.dtype), m1), (x_next if return_trajectory else None)

    zeros = jnp.zeros_like(x_T)
    (x, _, _), traj = jax.lax.scan(step, (x_T, zeros, zeros), xs)
    return x, solver_info(K, x_T, traj, return_trajectory)
