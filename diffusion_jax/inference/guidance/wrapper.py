"""Classifier guidance as a wrapper of any sampler's `denoise_fn(x, t)` (Dhariwal & Nichol 2021, Alg. 2 / eq. 14).

With x = alpha x0 + sigma eps, grad_x log p(x) = -eps_hat / sigma, so adding w grad_x log p(y | x) to the score is

    eps_hat'  = eps_hat - w sigma grad_x log p_phi(y | x, t)                                         (eq. 14)
    x0_hat'   = x0_hat + w (sigma^2 / alpha) grad_x log p_phi(y | x, t)      (the same x, so d x0 = -sigma/alpha d eps)

and in the other parameterizations, each linear in (x0, eps) at fixed x: v' = v + alpha d_eps - sigma d_x0,
score' = score + w grad_x log p_phi, EDM's D' = D + w s^2 grad (alpha = 1, sigma = s). With w = 1 and the exact
p(y | x_t), eps_hat' is exactly the class-conditional E[eps | x_t, y] (Bayes: log p(x | y) = log p(x) + log p(y | x)
- log p(y)); w > 1 sharpens p(y | x_t)^w (Dhariwal & Nichol sec. 4.2).

The wrapper returns a denoise_fn of the same kind, so every sampler (DDPM, DDIM and the grid solvers) uses it
unchanged. The level (alpha, sigma) behind the network time t a sampler passes is read back with
`editing.levels.noise_level(schedule, t, prediction)` (integer DDPM timesteps, fractional ones, VP / VE / EDM).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.inference.editing.levels import noise_level
from diffusion_jax.objectives.param import from_x0_eps
from diffusion_jax.samplers.wrapper import WRAPPER_PREDICTIONS

LogProbFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]   # (x, alpha, sigma) -> (B, K) log p(y | x)


def check_scale(scale, name: str = "classifier scale") -> float:
    """scale as a float; ValueError naming `name` unless it is a finite number >= 0."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {scale!r}")
    return float(scale)


def class_log_prob_grad(log_prob_fn: LogProbFn, x, labels, alpha, sigma):
    """grad_x log p(y_i | x_i) per example, shape of x. One backward pass for the batch: the gradient of
    sum_i log p(y_i | x_i) is per example as long as log_prob_fn treats examples independently."""
    def total(z):
        lp = log_prob_fn(z, alpha, sigma)
        return jnp.sum(jnp.take_along_axis(lp, labels[:, None], axis=1))
    return jax.grad(total)(x.astype(jnp.float32)).astype(x.dtype)


def guidance_delta(grad, alpha, sigma, scale: float, prediction: str):
    """The change of a prediction of kind `prediction` that eq. 14 makes: d_eps = -w sigma grad,
    d_x0 = -(sigma / alpha) d_eps; alpha, sigma broadcast against grad."""
    d_eps = -scale * sigma * grad
    if prediction == "eps":
        return d_eps
    d_x0 = scale * sigma ** 2 / alpha * grad
    return d_x0 if prediction == "edm" else from_x0_eps(prediction, d_x0, d_eps, alpha, sigma)


def classifier_guided(denoise_fn, log_prob_fn: LogProbFn, labels, schedule, scale: float, *,
                      prediction: str = "eps") -> Callable:
    """denoise_fn(x, t) with classifier guidance of weight `scale` toward `labels` (B,) int (module doc).

    log_prob_fn(x, alpha, sigma) -> (B, K) log p(y | x) at the level x = alpha x0 + sigma eps (for a trained
    classifier: `functools.partial(make_log_prob_fn(graphdef), params)`). schedule: the one the sampler runs
    on (its t is mapped back to (alpha, sigma)). prediction: the network's output kind (WRAPPER_PREDICTIONS); for
    "edm" denoise_fn receives (x / alpha, sigma / alpha) and so does the classifier (alpha = 1, sigma = s).
    A learned-variance output (2C channels) keeps its variance half. scale 0 returns denoise_fn itself.
    """
    scale = check_scale(scale)
    if prediction not in WRAPPER_PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is unknown; choose from {WRAPPER_PREDICTIONS}")
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be a (B,) int array, got shape {labels.shape} dtype {labels.dtype}")
    if scale == 0:
        return denoise_fn

    def guided(x, t):
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"classifier guidance got {labels.shape[0]} labels for a batch of {x.shape[0]}")
        out = denoise_fn(x, t)
        alpha, sigma = noise_level(schedule, jnp.broadcast_to(jnp.asarray(t), x.shape[:1]), prediction)
        grad = class_log_prob_grad(log_prob_fn, x, labels, alpha, sigma)
        per_example = (-1,) + (1,) * (x.ndim - 1)
        delta = guidance_delta(grad, alpha.reshape(per_example), sigma.reshape(per_example), scale, prediction)
        c = x.shape[-1]
        if out.shape[-1] == c:
            return out + delta.astype(out.dtype)
        return jnp.concatenate([out[..., :c] + delta.astype(out.dtype), out[..., c:]], axis=-1)

    return guided
