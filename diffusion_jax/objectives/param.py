"""Parameterizations of the network output and conversions between them.

With x_t = alpha_t x_0 + sigma_t eps (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), so
alpha_t^2 + sigma_t^2 = 1 for VP schedules) a network may predict

    eps   the noise (Ho et al. 2020),
    x0    the clean sample,
    v     alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, "progressive distillation"),
    score grad log q(x_t) = -eps / sigma_t,
    flow  the velocity eps - x_0 of the linear interpolant x_t = (1 - sigma) x_0 + sigma eps (flow matching,
          rectified flow; `process.flow`): x_0 = x_t - sigma v, eps = x_t + alpha v, for processes with
          alpha + sigma = 1 only.

All functions take arrays that broadcast against x_t (alpha, sigma of shape (B, 1, 1, 1) for images).
The formulas for v assume a variance-preserving process (alpha^2 + sigma^2 = 1).
"""
from __future__ import annotations

import jax.numpy as jnp

PREDICTIONS = ("eps", "x0", "v", "score", "flow")


def x0_from_eps(xt, eps, alpha, sigma):
    return (xt - sigma * eps) / alpha


def eps_from_x0(xt, x0, alpha, sigma):
    return (xt - alpha * x0) / sigma


def v_from_x0_eps(x0, eps, alpha, sigma):
    return alpha * eps - sigma * x0


def x0_from_v(xt, v, alpha, sigma):
    return alpha * xt - sigma * v


def eps_from_v(xt, v, alpha, sigma):
    return sigma * xt + alpha * v


def to_x0_eps(prediction: str, out, xt, alpha, sigma):
    """Convert a network output of kind `prediction` to the pair (x0_hat, eps_hat).

    Each pair is computed without dividing by a scale that can vanish where avoidable: x0 and v
    predictions give both terms by multiplication; eps and score need 1/alpha (large only at t ~ T).
    """
    if prediction == "eps":
        return x0_from_eps(xt, out, alpha, sigma), out
    if prediction == "x0":
        return out, eps_from_x0(xt, out, alpha, sigma)
    if prediction == "v":
        return x0_from_v(xt, out, alpha, sigma), eps_from_v(xt, out, alpha, sigma)
    if prediction == "score":
        eps = -sigma * out
        return x0_from_eps(xt, eps, alpha, sigma), eps
    if prediction == "flow":                     # alpha + sigma = 1; finite at alpha = 0 (pure noise) and sigma = 0
        return xt - sigma * out, xt + alpha * out
    raise ValueError(f"prediction={prediction!r} is unknown; choose from {PREDICTIONS}")


def from_x0_eps(prediction: str, x0, eps, alpha, sigma):
    """The training target of kind `prediction` for a given (x0, eps) pair."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    if prediction == "score":
        return -eps / sigma
    if prediction == "flow":
        return eps - x0
    raise ValueError(f"prediction={prediction!r} is unknown; choose from {PREDICTIONS}")


def convert(out, source: str, target: str, xt, alpha, sigma):
    """Convert a prediction of kind `source` into kind `target` at the same (x_t, t)."""
    if source == target:
        return out
    x0, eps = to_x0_eps(source, out, xt, alpha, sigma)
    return from_x0_eps(target, x0, eps, alpha, sigma)


def mse_to_x0_mse_factor(prediction: str, snr):
    """c_k(SNR) with ||target_k - pred_k||^2 = c_k(SNR) ||x0 - x0_hat||^2 at fixed x_t.

    From x_t = alpha x0 + sigma eps, an x0 error e0 implies eps error -(alpha/sigma) e0, so
    c_eps = SNR, c_x0 = 1, c_v = SNR + 1 (VP), c_score = SNR / sigma^2 = SNR (1 + SNR),
    c_flow = 1 / sigma^2 = (1 + sqrt(SNR))^2 (alpha + sigma = 1: an x0 error e0 is a velocity error -e0 / sigma).
    """
    if prediction == "eps":
        return snr
    if prediction == "x0":
        return jnp.ones_like(snr)
    if prediction == "v":
        return snr + 1.0
    if prediction == "score":
        return snr * (1.0 + snr)
    if prediction == "flow":
        return (1.0 + jnp.sqrt(snr)) ** 2
    raise ValueError(f"prediction={prediction!r} is unknown; choose from {PREDICTIONS}")
