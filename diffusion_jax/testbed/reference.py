"""The probability-flow ODE of a Gaussian mixture, solved to high accuracy: ground truth for solver tests.

Coordinates. For any schedule x_t = alpha_t x0 + sigma_t eps, put y = x / alpha and s = sigma / alpha
(Karras et al. 2022, "EDM", eq. 4 with s(t) = 1/alpha: the VE form). Then y = x0 + s n, with marginal
p_s = p * N(0, s^2 I) (the mixture noised at alpha = 1, sigma = s), and every schedule's probability-flow
ODE (Song et al. 2021, eq. 13) traces the same curves

    dy/ds = -s grad_y log p_s(y) = (y - D(y; s)) / s,        D(y; s) = E[x0 | y] (Tweedie).

The middle form has no 1/s: for a mixture with stds > 0 the score is finite at s = 0, so the ODE is
integrated right down to s = 0 (no final denoiser jump, no s_min). For one component N(mu, c^2 I) it is
linear: y(s) - mu = sqrt(c^2 + s^2) / sqrt(c^2 + s_T^2) (y_T - mu).

The solution is computed in float64 (inside `jax.enable_x64`, which restores the previous mode on exit)
with diffrax's adaptive Dopri8 (8th order; Prince & Dormand 1981) in a normalized time tau in [0, 1],
s(tau) = s_from + tau (s_to - s_from) per example.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _per_example(v, batch):
    v = np.asarray(v, np.float64)
    return np.broadcast_to(v.reshape(-1) if v.ndim else v, (batch,))


def reference_ode_solution(mixture, x_T, sigma_from, sigma_to=0.0, *, alpha_from=1.0, alpha_to=1.0,
                           rtol: float = 1e-10, atol: float = 1e-10, max_steps: int = 100_000) -> np.ndarray:
    """Carry x_T (B, d) or (B, ...) at (alpha_from, sigma_from) along the PF-ODE to (alpha_to, sigma_to).

    alpha/sigma: scalars or (B,) arrays. The result is float64 numpy with the shape of x_T, in the
    coordinates x = alpha_to y of the target noise level; with the defaults (sigma_to = 0, alpha_to = 1) that
    is the clean sample x0 in data space, for any schedule. Pass alpha_to = schedule alpha at the target to
    stop at an intermediate VP x_t. Accuracy: about rtol relative (1e-10 by default; see the tests).
    """
    import diffrax  # a dependency of the testbed only

    x_T = np.asarray(x_T, np.float64)
    B = x_T.shape[0]
    a_T, a_0 = _per_example(alpha_from, B), _per_example(alpha_to, B)
    s_T, s_0 = _per_example(sigma_from, B) / a_T, _per_example(sigma_to, B) / a_0
    if np.any(s_T < 0) or np.any(s_0 < 0):
        raise ValueError("sigma / alpha must be >= 0")
    with jax.enable_x64(True):
        mix = mixture.astype(jnp.float64)
        y_T = jnp.asarray(x_T.reshape(B, -1) / a_T[:, None])
        s_T_, ds = jnp.asarray(s_T), jnp.asarray(s_0 - s_T)

        def field(tau, y, args):                    # dy/dtau = ds/dtau * (-s score(y; s))
            s = s_T_ + tau * ds
            return -(ds * s)[:, None] * mix.score(y, 1.0, s)

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Dopri8(), t0=0.0, t1=1.0, dt0=None, y0=y_T,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
            saveat=diffrax.SaveAt(t1=True))
        y = np.asarray(sol.ys[-1])
    return (a_0[:, None] * y).reshape(x_T.shape)


def single_gaussian_pf_ode(mean, std, x_T, sigma_from, *, alpha_from=1.0) -> np.ndarray:
    """Analytic PF-ODE map to sigma = 0 for data N(mean, std^2 I) (K = 1), float64 numpy:

        x0 = mu + std (x_T - alpha_T mu) / sqrt(alpha_T^2 std^2 + sigma_T^2).
    """
    x_T = np.asarray(x_T, np.float64)
    shape = (x_T.shape[0],) + (1,) * (x_T.ndim - 1)
    a = _per_example(alpha_from, x_T.shape[0]).reshape(shape)
    s = _per_example(sigma_from, x_T.shape[0]).reshape(shape)
    mu = np.asarray(mean, np.float64).reshape(x_T.shape[1:]) if np.ndim(mean) else float(mean)
    return mu + std * (x_T - a * mu) / np.sqrt(a ** 2 * std ** 2 + s ** 2)
