"""Which training timesteps a sampler visits, and the schedule restricted to them ("respacing").

Timestep selection follows diffusers' `DDIMScheduler.set_timesteps` (Lin et al. 2024, Table 2):

    leading   arange(S) * (T // S), reversed                  (DDIM / Stable Diffusion default)
    trailing  round(arange(T, 0, -T / S)) - 1                  (always starts at t = T - 1)
    linspace  round(linspace(0, T - 1, S)), reversed

Respacing (Nichol & Dhariwal 2021, sec. 4): keeping the timesteps t_1 < ... < t_S defines a new diffusion
with the same alpha_bar at the kept steps, alpha_bar'_j = alpha_bar_{t_j}, hence new betas
beta'_j = 1 - alpha_bar_{t_j} / alpha_bar_{t_{j-1}} (alpha_bar_{t_0} := 1), and its own posterior
q(x_{t_{j-1}} | x_{t_j}, x_0) (Ho et al. 2020, eq. 6-7). DDIM's sigma_t(eta)^2 (Song et al. 2021, eq. 16) is
eta^2 times the posterior variance of that respaced diffusion.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.objectives.param import PREDICTIONS

SPACINGS = ("leading", "trailing", "linspace")


def select_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading") -> np.ndarray:
    """Descending int64 timesteps (steps,) in [0, T), as diffusers' DDIMScheduler.set_timesteps(steps).

    One difference: for some (T, steps) diffusers' "trailing" returns steps + 1 values ending in -1 (a float
    `arange` overshoot, e.g. T=1000, steps=61); we keep the first `steps` of them.
    """
    T = int(num_train_timesteps)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"sampler.steps must be an int in [1, {T}] (the training timesteps), got {steps!r}")
    steps = int(steps)
    if spacing == "leading":
        ts = (np.arange(steps) * (T // steps))[::-1]
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[:steps] - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1]
    else:
        raise ValueError(f"sampler.spacing={spacing!r} is unknown; choose from {SPACINGS}")
    return np.ascontiguousarray(ts).astype(np.int64)


class StepTables(NamedTuple):
    """Per-step scalars of the respaced diffusion, in sampling order (t descending). *_prev is the next kept
    timestep (alpha_prev = 1, sigma_prev = 0 after the last step)."""

    t: jax.Array                    # int32 training timesteps
    alpha: jax.Array                # sqrt(alpha_bar_t)
    sigma: jax.Array                # sqrt(1 - alpha_bar_t)
    alpha_prev: jax.Array
    sigma_prev: jax.Array
    beta: jax.Array                 # beta'_t = 1 - alpha_bar_t / alpha_bar_prev
    posterior_variance: jax.Array   # beta~'_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta'_t   (Ho eq. 7)
    posterior_log_variance_clipped: jax.Array  # log beta~', with the last step's (0) replaced by the one before


def respace(schedule, timesteps: np.ndarray) -> StepTables:
    """Tables of the diffusion restricted to `timesteps` (descending). Works on traced schedules (jit).

    beta' and 1 - alpha_bar are computed in the log domain, log(1 - beta'_j) = sum_{t_{j-1} < s <= t_j}
    log(1 - beta_s), so that float32 keeps their relative precision at small t.
    """
    asc = np.asarray(timesteps)[::-1]
    n, T = len(asc), schedule.num_timesteps
    segment = np.searchsorted(asc, np.arange(T), side="left")  # s in (t_{j-1}, t_j] -> j; s > t_max dropped
    log_alpha = jax.ops.segment_sum(jnp.log1p(-schedule.betas), segment, num_segments=n)
    beta = -jnp.expm1(log_alpha)
    one_minus_abar = -jnp.expm1(jnp.cumsum(log_alpha))
    abar = schedule.alphas_cumprod[asc]
    abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
    one_minus_abar_prev = jnp.concatenate([jnp.zeros((1,), abar.dtype), one_minus_abar[:-1]])
    post_var = beta * one_minus_abar_prev / one_minus_abar
    post_logvar = jnp.log(jnp.concatenate([post_var[1:2], post_var[1:]])) if n > 1 else jnp.log(beta)
    tables = StepTables(jnp.asarray(asc, jnp.int32), jnp.sqrt(abar), jnp.sqrt(one_minus_abar), jnp.sqrt(abar_prev),
                        jnp.sqrt(one_minus_abar_prev), beta, post_var, post_logvar)
    return jax.tree.map(lambda a: a[::-1], tables)


def check_prediction(prediction: str, clip_denoised) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"sampler.prediction={prediction!r} is unknown; choose from {PREDICTIONS}")
    if clip_denoised is not None and not clip_denoised > 0:
        raise ValueError(f"sampler.clip_denoised must be None or > 0, got {clip_denoised!r}")
