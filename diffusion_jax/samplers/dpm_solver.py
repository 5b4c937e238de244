"""DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b): exponential integrators in lam = log(alpha/sigma).

With x = alpha x0 + sigma eps, the probability-flow ODE is semi-linear and its exact solution from level s to t is

    x_t = alpha_t/alpha_s x_s - alpha_t int_{lam_s}^{lam_t} e^{-lam} eps_hat dlam            (2022a, eq. 3.4; noise)
    x_t = sigma_t/sigma_s x_s + sigma_t int_{lam_s}^{lam_t} e^{lam} x0_hat dlam              (2022b, Sec. 4; data, "++")

and the SDE-DPM-Solver++ step (2022b; diffusers' "sde-dpmsolver++") is
    x_t = sigma_t/sigma_s e^{-h} x_s + 2 alpha_t int e^{-2(lam_t - lam)} x0_hat dlam + sigma_t sqrt(1 - e^{-2h}) z.
Expanding the prediction m(lam) about the base s (D0 = m, D1 ~ h m', D2 ~ h^2 m'', h = lam_t - lam_s), every
variant is one formula in the "h phi_k" functions of g (g = -h data, h noise, -2h SDE):

    x_t = A x_s - c (e1(g) D0 + e2(g) D1 + e3(g) D2) [+ sigma_t sqrt(-expm1(-2h)) z]
    e1 = expm1(g) = g phi_1(g),  e2 = e1/g - 1 = g phi_2(g),  e3 = e2/g - 1/2 = g phi_3(g)      (2022a Sec. 3.3, App. B)
    (A, c) = (sigma_t/sigma_s, alpha_t) data | (alpha_t/alpha_s, sigma_t) noise | (sigma_t/sigma_s e^{-h}, alpha_t) SDE

solver_type="midpoint" replaces e2 by e1 / 2 in the second-order update (2022a Alg. 1 / 2022b Alg. 2 as written
with "e^{-h} - 1"; same order), as diffusers. Multistep (2022b Alg. 2, "2M"; "3M") estimates D1, D2 by divided
differences of the previous outputs. Note on 3M: the reference code (dpm_solver_pytorch.py, and diffusers) takes
D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 m'' / 2, half of what e3 multiplies, which makes "3M" second order (see the
tests: slope 2.0 on a cubic x0_hat(lam)); we use 2 (D1_0 - D1_1) / (r0 + r1) (third order) unless diffusers_3m=True.
Singlestep (2022a Alg. 1, 2; 2022b Alg. 1, "2S") uses the grid's own levels as its intermediate points, as diffusers'
DPMSolverSinglestepScheduler: a block of k steps is one DPM-Solver-k step whose stages are the grid points (r = ratios
of lam gaps; on a uniform-lam grid r1 = 1/2, or 1/3 and 2/3 as in 2022a).

Clean end (sigma_t = 0, lam_t = +inf, the final level of a final="zero" grid): every first-order update degenerates
to x_t = alpha_t x0_hat (data: sigma_t/sigma_s = 0, e1 = -1; noise: the limit of the same formula), the step diffusers
takes there (final_sigmas_type="zero" forces first order). We return alpha_t x0_hat(x_i) at such a step, whatever
the order, without forming h = inf (so there are no NaNs, also under jax.grad).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.checks import check_bool, check_choice, check_key

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


def check_common(grid, x_T, order: int, return_trajectory, orders=(1, 2, 3)) -> int:
    """Validates the options shared by the solvers; returns K (static)."""
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)):
        raise ValueError(f"sampler.order must be one of {orders}, got {order!r}")
    check_choice("order", order, orders)
    if not hasattr(grid, "sigma") or grid.t.ndim != 1 or grid.t.shape[0] < 2:
        raise ValueError("grid must be a Grid with at least 2 levels (one step)")
    if not hasattr(x_T, "shape") or len(x_T.shape) < 1:
        raise ValueError(f"x_T must be an array (B, ...), got {type(x_T).__name__}")
    check_bool(return_trajectory=return_trajectory)
    return grid.num_steps


def exp_coeffs(kind: str, lam_s, alpha_s, sigma_s, lam_t, alpha_t, sigma_t):
    """(h, A, c, g, clean, still) of the module doc for a step s -> t. h is made finite (1) at a clean end
    (sigma_t = 0) and for a zero-length step (lam_t = lam_s: diffusers' karras grids with final "sigma_min" repeat
    the last level; also the placeholder of a masked-out update), which the caller turns into x_t = x_s (still)."""
    clean, still = sigma_t <= 0, lam_t == lam_s
    h = jnp.where(clean | still, 1.0, lam_t - lam_s)
    if kind == "dpmsolver":
        return h, alpha_t / alpha_s, sigma_t, h, clean, still
    if kind == "sde-dpmsolver++":
        return h, sigma_t / sigma_s * jnp.exp(-h), alpha_t, -2.0 * h, clean, still
    return h, sigma_t / sigma_s, alpha_t, -h, clean, still


def h_phis(g):
    """e1, e2, e3 = g phi_1(g), g phi_2(g), g phi_3(g) (module doc); g != 0."""
    e1 = jnp.expm1(g)
    e2 = e1 / g - 1.0
    return e1, e2, e2 / g - 0.5


def level_arrays(grid, idx):
    """(t, alpha, sigma, lam) of the grid at the static integer index array idx (clamped at 0)."""
    idx = np.maximum(np.asarray(idx), 0)
    lam = jnp.log(grid.alpha) - jnp.log(grid.sigma)
    return grid.t[idx], grid.alpha[idx], grid.sigma[idx], lam[idx]


def step_noise(key, i, x):
    return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)


def _select(order, *cands):
    out = cands[-1]
    for k in range(len(cands) - 1, 0, -1):
        out = jnp.where(order == k, cands[k - 1], out)
    return out


def _check_dpm(algorithm, solver_type, lower_order_final, key):
    check_choice("algorithm", algorithm, ALGORITHMS)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_bool(lower_order_final=lower_order_final)
    if algorithm.startswith("sde"):
        check_key(key, f"algorithm={algorithm!r}")


def multistep_orders(K: int, order: int, lower_order_final: bool, euler_at_final: bool) -> np.ndarray:
    """diffusers' DPMSolverMultistepScheduler.step order rule: warm-up 1, 2, ...; lower_order_final only for K < 15."""
    o = np.minimum(order, np.arange(K) + 1)
    if lower_order_final and K < 15:
        o[-2:] = np.minimum(o[-2:], [2, 1][-min(K, 2):])
    if euler_at_final:
        o[-1] = 1
    return o


def dpm_solver_multistep(denoiser, grid, x_T, key=None, *, order: int = 2, algorithm: str = "dpmsolver++",
                         solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                         diffusers_3m: bool = False, return_trajectory: bool = False):
    """Multistep DPM-Solver(++) on `grid`: order 2 = DPM-Solver++(2M) (2022b, Alg. 2), 3 = 3M; algorithm
    "sde-dpmsolver++" = SDE-DPM-Solver++(2M) (noise for step i from fold_in(key, i)). One network call per step.
    Orders as diffusers' DPMSolverMultistepScheduler (warm-up 1, 2; lower_order_final only when K < 15).
    diffusers_3m=True: diffusers' (second-order) 3M D2, for parity; for SDE order 3 diffusers also flips the sign of
    the 1/2 in e3 (their coefficient tends to -alpha_t, not 0, as h -> 0), which we do not reproduce.

    Returns (x_0, {"nfe": K[, "trajectory": (K+1, *x.shape)]}): trajectory[i] is the sample at level i.
    """
    K = check_common(grid, x_T, order, return_trajectory)
    _check_dpm(algorithm, solver_type, lower_order_final, key)
    check_bool(euler_at_final=euler_at_final, diffusers_3m=diffusers_3m)
    orders = multistep_orders(K, order, lower_order_final, euler_at_final)
    i = np.arange(K)
    xs = (i, orders, level_arrays(grid, i), level_arrays(grid, i - 1)[3], level_arrays(grid, i - 2)[3],
          level_arrays(grid, i + 1)[1:])
    x_pred = algorithm != "dpmsolver"

    def step(carry, inp):
        x, m1, m2 = carry                                      # outputs at the previous two levels
        n, o, (t, a_s, s_s, l_s), l_1, l_2, (a_t, s_t, l_t) = inp
        x0, eps = denoiser(x, t, a_s, s_s)
        m0 = x0 if x_pred else eps
        h, A, c, g, clean, still = exp_coeffs(algorithm, l_s, a_s, s_s, l_t, a_t, s_t)
        e1, e2, e3 = h_phis(g)
        r0 = jnp.where(o >= 2, (l_s - l_1) / h, 1.0)
        r1 = jnp.where(o >= 3, (l_1 - l_2) / h, 1.0)
        d10, d11 = (m0 - m1) / r0, (m1 - m2) / r1
        u1 = e1 * m0                                                         # DPM-Solver-1 = DDIM (2022b eq. 9)
        u2 = u1 + (0.5 * e1 if solver_type == "midpoint" else e2) * d10      # 2M (2022b Alg. 2)
        d1, d2 = d10 + r0 / (r0 + r1) * (d10 - d11), (1.0 if diffusers_3m else 2.0) * (d10 - d11) / (r0 + r1)
        u3 = u1 + e2 * d1 + e3 * d2                                          # 3M (module doc)
        x_next = A * x - c * _select(o, u1, u2, u3)
        if algorithm.startswith("sde"):
            x_next = x_next + s_t * jnp.sqrt(-jnp.expm1(-2.0 * h)) * step_noise(key, n, x)
        x_next = jnp.where(clean, a_t * x0, jnp.where(still, x, x_next)).astype(x.dtype)
        return (x_next, m0, m1), (x_next if return_trajectory else None)

    zeros = jnp.zeros_like(x_T)
    (x, _, _), traj = jax.lax.scan(step, (x_T, zeros, zeros), xs)
    return x, solver_info(K, x_T, traj, return_trajectory)


def singlestep_orders(K: int, order: int, lower_order_final: bool) -> np.ndarray:
    """diffusers' DPMSolverSinglestepScheduler.get_order_list: blocks [1, .., k]; with lower_order_final the last
    block is [1, .., K mod k] (K mod k = 0: [1, .., k - 1] + [1])."""
    o = [q for _ in range(K // order) for q in range(1, order + 1)] + list(range(1, K % order + 1))
    if lower_order_final and K % order == 0 and order > 1:
        o = o[:-order] + list(range(1, order)) + [1]
    return np.asarray(o, np.int32)


def dpm_solver_singlestep(denoiser, grid, x_T, key=None, *, order: int = 2, algorithm: str = "dpmsolver++",
                          solver_type: str = "midpoint", lower_order_final: bool = False,
                          return_trajectory: bool = False):
    """Singlestep DPM-Solver-1/2/3 (2022a Alg. 1, 2; "++": 2022b Alg. 1) with the grid's levels as stages (module doc).
    Orders as diffusers' get_order_list (lower_order_final=False is its default; K not a multiple of the order ends
    with a shorter block; a step to sigma = 0 is first order).

    Steps of order q go from the block start (q - 1 levels back) to the next level; trajectory[i] is the sample the
    network sees at level i (a stage value inside a block). One network call per step: nfe = K.
    """
    K = check_common(grid, x_T, order, return_trajectory)
    _check_dpm(algorithm, solver_type, lower_order_final, key)
    orders = singlestep_orders(K, order, lower_order_final)
    i = np.arange(K)
    base = level_arrays(grid, i - orders + 1)
    xs = (i, orders, level_arrays(grid, i), level_arrays(grid, i - 1)[3], base, level_arrays(grid, i + 1)[1:])
    x_pred = algorithm != "dpmsolver"

    def step(carry, inp):
        x, xb, m1, m2 = carry                                  # block start, outputs at the previous two levels
        n, o, (t, a_i, s_i, l_i), l_1, (_, a_b, s_b, l_b), (a_t, s_t, l_t) = inp
        x0, eps = denoiser(x, t, a_i, s_i)
        m0 = x0 if x_pred else eps
        xb = jnp.where(o == 1, x, xb)
        h, A, c, g, clean, still = exp_coeffs(algorithm, l_b, a_b, s_b, l_t, a_t, s_t)
        e1, e2, e3 = h_phis(g)
        r0 = jnp.where(o >= 2, (l_i - l_b) / h, 1.0)           # position of the last stage, (0, 1)
        r1 = jnp.where(o >= 3, (l_1 - l_b) / h, -1.0)           # order 3: position of the first stage
        u1 = e1 * m0
        u2 = e1 * m1 + (0.5 * e1 if solver_type == "midpoint" else e2) * (m0 - m1) / r0     # 2022a Alg. 1
        d10, d11 = (m1 - m2) / r1, (m0 - m2) / r0
        if solver_type == "midpoint":                          # 2022a Alg. 2: only the last stage's difference
            u3 = e1 * m2 + e2 * d11
        else:
            u3 = e1 * m2 + e2 * (r0 * d10 - r1 * d11) / (r0 - r1) + e3 * 2.0 * (d11 - d10) / (r0 - r1)
        x_next = A * xb - c * _select(o, u1, u2, u3)
        if algorithm.startswith("sde"):
            x_next = x_next + s_t * jnp.sqrt(-jnp.expm1(-2.0 * h)) * step_noise(key, n, x)
        x_next = jnp.where(clean, a_t * x0, jnp.where(still, xb, x_next)).astype(x.dtype)
        return (x_next, xb, m0, m1), (x_next if return_trajectory else None)

    zeros = jnp.zeros_like(x_T)
    (x, *_), traj = jax.lax.scan(step, (x_T, x_T, zeros, zeros), xs)
    return x, solver_info(K, x_T, traj, return_trajectory)


def solver_info(K, x_T, traj, return_trajectory):
    """The info dict every solver returns: nfe, and the trajectory (K+1, *x.shape) with x_T first if asked."""
    info = {"nfe": K}
    if return_trajectory:
        info["trajectory"] = jnp.concatenate([x_T[None].astype(traj.dtype), traj])
    return info
