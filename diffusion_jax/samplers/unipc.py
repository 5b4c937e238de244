"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models").

Multistep exponential integrator in lambda = log(alpha / sigma) (see `dpm_solver` for the exact solution it
discretizes). With model outputs m_i (x0_hat when predict_x0, else eps_hat), base s = level i, target t = i + 1,
h = lam_t - lam_s, hh = -h (data) or h (noise), e1 = expm1(hh), and B(hh) = hh ("bh1") or expm1(hh) ("bh2"):

  UniP-p (predictor):   x_t = A x_s - c (e1 m_s + B(hh) sum_{k=1}^{p-1} a_k D_k),   D_k = (m_{s_k} - m_s) / r_k,
                        r_k = (lam_{s_k} - lam_s) / h for the previous levels s_k = i - k
  UniC-p (corrector):   x_t^c = A x_s - c (e1 m_s + B(hh) (sum_{k=1}^{p-1} a^c_k D_k + a^c_p (m_t - m_s))), r_p = 1,
                        m_t = the output at the predicted x_t, which is reused by the next predictor (no extra call)

(A, c) = (sigma_t/sigma_s, alpha_t) for data, (alpha_t/alpha_s, sigma_t) for noise. The coefficients solve the
order conditions  R a = b,  R_{jk} = r_k^{j-1},  b_j = j! h phi_{j+1}(hh) / B(hh)  (Zhao et al. 2023, Sec. 3,
B(h) form; phi recursion h phi_{k+1} = h phi_k / hh - 1/k!), except a = 1/2 for UniP-2 and UniC-1 (as the
reference code and diffusers). With the solved coefficients B(h) cancels, so bh1 and bh2 differ only in those two
fixed-1/2 steps. UniC-p raises UniP-p's order by one (Zhao et al. 2023, Sec. 3; measured: order 3 -> 4).
Step i: evaluate m_i at the predicted x_i, correct x_i with UniC of the previous step's order (unless i - 1 is in
disable_corrector), then predict x_{i+1}. The last prediction is not corrected (no network call there).
Order schedule as diffusers' UniPCMultistepScheduler: warm-up p_i = min(order, i + 1); lower_order_final:
p_i = min(p_i, K - i). A step to the clean end (sigma = 0) returns alpha_t x0_hat (see `dpm_solver`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.checks import check_bool, check_choice
from diffusion_jax.samplers.dpm_solver import check_common, exp_coeffs, level_arrays, solver_info

VARIANTS = ("bh1", "bh2")


def _rhs(hh, B, p: int):
    """b_1..b_p of the order conditions (diffusers' loop over h_phi_k)."""
    b, hphi = [], jnp.expm1(hh) / hh - 1.0
    for j in range(1, p + 1):
        b.append(hphi * math.factorial(j) / B)
        hphi = hphi / hh - 1.0 / math.factorial(j + 1)
    return b


def _solve(rs, b):
    """a with sum_k r_k^{j-1} a_k = b_j, j = 1..len(rs) (rs: scalars)."""
    n = len(rs)
    if n == 1:
        return [b[0]]
    R = jnp.stack([jnp.stack([r ** j for r in rs]) for j in range(n)])
    a = jnp.linalg.solve(R, jnp.stack(b[:n]))
    return [a[k] for k in range(n)]


def _uni_update(kind, variant, x_s, m_s, ms_prev, lams_prev, lvl_s, lvl_t, p_static: int, valid, m_t=None):
    """UniP-p (m_t None) or UniC-p update from level s to t. ms_prev / lams_prev: outputs and lambdas at s_1, s_2.
    Where not `valid` (the step uses a lower order) distinct dummy r_k keep the algebra finite (no NaN gradients)."""
    (a_s, s_s, l_s), (a_t, s_t, l_t) = lvl_s, lvl_t
    algorithm = "dpmsolver" if kind == "noise" else "dpmsolver++"
    h, A, c, _, clean, still = exp_coeffs(algorithm, l_s, a_s, s_s, l_t, a_t, s_t)
    hh = h if kind == "noise" else -h
    e1 = jnp.expm1(hh)
    B = hh if variant == "bh1" else e1
    n_prev = p_static - 1                                     # history terms used
    rs = [jnp.where(valid, (lams_prev[k] - l_s) / h, -1.0 - k) for k in range(n_prev)]
    Ds = [(ms_prev[k] - m_s) / rs[k] for k in range(n_prev)]
    if m_t is None:                                           # UniP-p: p - 1 coefficients
        a = [0.5] if p_static <= 2 else _solve(rs, _rhs(hh, B, p_static))
        res = sum((a[k] * Ds[k] for k in range(n_prev)), jnp.zeros_like(x_s))
    else:                                                     # UniC-p: p coefficients, r_p = 1
        a = [0.5] if p_static == 1 else _solve(rs + [jnp.ones_like(h)], _rhs(hh, B, p_static))
        res = sum((a[k] * Ds[k] for k in range(n_prev)), a[-1] * (m_t - m_s))
    return jnp.where(still, x_s, A * x_s - c * (e1 * m_s + B * res)), clean


def unipc_orders(K: int, order: int, lower_order_final: bool) -> np.ndarray:
    o = np.minimum(order, np.arange(K) + 1)
    return np.minimum(o, K - np.arange(K)) if lower_order_final else o


def unipc(denoiser, grid, x_T, key=None, *, order: int = 2, variant: str = "bh2", predict_x0: bool = True,
          disable_corrector=(), lower_order_final: bool = True, return_trajectory: bool = False):
    """UniPC-p multistep sampling on `grid` (module doc); key is unused (deterministic). One network call per step.

    Returns (x_0, {"nfe": K[, "trajectory": (K+1, *x.shape)]}); trajectory[i] is the (uncorrected) sample the network
    sees at level i, as diffusers' prev_sample; the corrected one replaces it inside the next step.
    """
    del key
    K = check_common(grid, x_T, order, return_trajectory)
    check_choice("variant", variant, VARIANTS)
    check_bool(predict_x0=predict_x0, lower_order_final=lower_order_final)
    try:
        disabled = {int(v) for v in disable_corrector}
    except (TypeError, ValueError):
        raise ValueError(f"sampler.disable_corrector must be a sequence of step indices, got {disable_corrector!r}")
    kind = "data" if predict_x0 else "noise"
    p_pred = unipc_orders(K, order, lower_order_final)
    i = np.arange(K)
    corr = np.array([n > 0 and (n - 1) not in disabled for n in i])
    p_corr = np.where(corr, np.concatenate([[0], p_pred[:-1]]), 0)          # UniC order at step i (0: none)
    lv = [level_arrays(grid, i - k) for k in range(4)]                      # levels i, i-1, i-2, i-3
    xs = (p_pred, p_corr, lv[0], [v[1:] for v in lv[1:]], [v[3] for v in lv[1:]], level_arrays(grid, i + 1)[1:])

    def step(carry, inp):
        x, x_last, m1, m2, m3 = carry          # predicted x_i, corrected x_{i-1}, outputs at i-1, i-2, i-3
        pp, pc, (t, a_i, s_i, l_i), prev, lams, lvl_t = inp
        x0, eps = denoiser(x, t, a_i, s_i)
        m0 = x0 if predict_x0 else eps
        xc = x
        for q in range(1, min(order, K) + 1):                                # UniC-q from level i-1 to i
            x_q, _ = _uni_update(kind, variant, x_last, m1, [m2, m3], lams[1:], prev[0], (a_i, s_i, l_i), q,
                                 pc >= q, m0)
            xc = jnp.where(pc == q, x_q, xc)
        x_next = xc
        for q in range(1, min(order, K) + 1):                                # UniP-q from level i to i+1
            x_q, clean = _uni_update(kind, variant, xc, m0, [m1, m2], lams, (a_i, s_i, l_i), lvl_t, q, pp >= q)
            x_next = jnp.where(pp == q, x_q, x_next)
        x_next = jnp.where(clean, lvl_t[0] * x0, x_next).astype(x.dtype)
        return (x_next, xc, m0, m1, m2), (x_next if return_trajectory else None)

    zeros = jnp.zeros_like(x_T)
    (x, *_), traj = jax.lax.scan(step, (x_T, x_T, zeros, zeros, zeros), xs)
    return x, solver_info(K, x_T, traj, return_trajectory)
