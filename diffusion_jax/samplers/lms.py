"""LMS: the linear multistep (Adams-Bashforth) sampler on the probability-flow ODE in sigma (k-diffusion's sample_lms,
after Karras et al. 2022, "EDM"), as diffusers' LMSDiscreteScheduler.

In EDM coordinates y = x / alpha, s = sigma / alpha (`Grid.sigma_ve`) the PF-ODE of every schedule is

    dy/ds = d(y; s) = (y - D(y; s)) / s = eps_hat                                   (EDM eq. 3, `ode_derivative`)

Step i (level s_i -> s_{i+1}) replaces d along the step by the Lagrange polynomial through the last q derivatives
d_{i-j} = d(y_{i-j}; s_{i-j}), j < q, on the grid's own (unequal) levels, and integrates it exactly:

    y_{i+1} = y_i + sum_{j<q} c_ij d_{i-j},      c_ij = int_{s_i}^{s_{i+1}} l_j(s) ds,
    l_j(s)  = prod_{k<q, k!=j} (s - s_{i-k}) / (s_{i-j} - s_{i-k})                   (Lagrange basis in s)

with q = min(order, i + 1) (the warm-up, as diffusers). l_j has degree q - 1 <= 3, so the 2-point Gauss-Legendre
rule on [s_i, s_{i+1}] gives c_ij exactly (diffusers: scipy.integrate.quad of the same polynomial, evaluated in
float32). order = 1 is Euler. The derivative is only evaluated at the levels s_i > 0 the steps start from, so a grid
ending at the clean level (sigma = 0) is integrated to s = 0 without calling the denoiser there, as diffusers does.
A zero-length step (s_{i+1} = s_i, e.g. a padded grid) leaves y unchanged.

The carry is y; levels, trajectory and result are in the grid's (VP) coordinates x_i = alpha_i y_i. diffusers'
scheduler carries x_ve = y (its scale_model_input divides by sqrt(s^2 + 1) = 1 / alpha).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.dpm_solver import check_common
from diffusion_jax.samplers.euler import check_grid, with_trajectory
from diffusion_jax.samplers.grid import Grid
from diffusion_jax.samplers.quadrature import lagrange_integrals
from diffusion_jax.samplers.wrapper import ode_derivative

ORDERS = (1, 2, 3, 4)


def lms_coefficients(nodes, q, s_cur, s_next):
    """c_j = int_{s_cur}^{s_next} l_j(s) ds for j < 4 (0 for j >= q), l_j the Lagrange basis on nodes[:q] (module
    doc). nodes (4,) = s_i, s_{i-1}, s_{i-2}, s_{i-3} (entries past q are ignored); q an int or a traced int."""
    return lagrange_integrals(nodes, q, s_cur, s_next, points=2)       # exact: degree <= 3


def lms(denoiser, grid: Grid, x_T, key=None, *, order: int = 4, return_trajectory: bool = False):
    """LMS of `order` (1-4) over the K steps of `grid` from x_T (VP coordinates): diffusers' LMSDiscreteScheduler
    with step(..., order=order). key is unused (deterministic). Returns (x_0, {"nfe": K, "trajectory" if asked})."""
    check_common(grid, x_T, order, return_trajectory, orders=ORDERS)
    x_T = check_grid(grid, x_T)
    K = grid.num_steps
    i = np.arange(K)
    s = grid.sigma_ve
    back = np.maximum(i[:, None] - np.arange(4)[None, :], 0)                 # (K, 4) static indices i - j, clamped
    xs = (np.minimum(order, i + 1), s[back], grid.t[:-1], grid.alpha[:-1], grid.sigma[:-1], grid.alpha[1:], s[1:])
    deriv = ode_derivative(denoiser)

    def step(carry, inp):
        y, hist = carry                                     # hist: d_{i-1}, d_{i-2}, d_{i-3}
        q, nodes, t, a, sg, a_n, s_next = inp
        d, _ = deriv(y, t, a, sg)
        ds = jnp.concatenate([d[None], hist])
        c = lms_coefficients(nodes, q, nodes[0], s_next).astype(ds.dtype)
        y_next = y + jnp.tensordot(c, ds, axes=1)
        y_next = jnp.where(s_next == nodes[0], y, y_next).astype(y.dtype)
        return (y_next, ds[:3]), (a_n * y_next if return_trajectory else None)

    y0 = (x_T / grid.alpha[0]).astype(x_T.dtype)
    (y, _), xs_out = jax.lax.scan(step, (y0, jnp.zeros((3,) + x_T.shape, x_T.dtype)), xs)
    return grid.alpha[-1] * y, {"nfe": K, **with_trajectory(x_T, xs_out, return_trajectory)}
