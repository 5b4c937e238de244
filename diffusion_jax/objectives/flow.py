"""Flow matching (conditional flow matching on the linear interpolant; Lipman et al. 2023, Liu et al. 2023), with the
time samplers of Stable Diffusion 3 (Esser et al. 2024, sec. 3.1):

    L(theta) = E_{t ~ pi, x_0, eps} || v_theta(x_t, t) - (eps - x_0) ||^2,     x_t = (1 - sigma_t) x_0 + sigma_t eps

(per pixel: averaged over the data dimensions), sigma_t the process's (shifted) noise level (`process.flow`). The
network may predict the velocity ("flow") or eps / x0; its output is turned into v_hat = eps_hat - x0_hat
(`param.to_x0_eps`), so every parameterization trains the same velocity MSE (SD3's point of view: eps-prediction is a
weighting of it). Time samplers pi on t in (0, 1), before the shift:

    "uniform"        t ~ U(0, 1)                                        (rectified flow)
    "logit_normal"   t = sigmoid(m + s n), n ~ N(0, 1)                  (SD3's rf/lognorm(m, s); its default 0, 1)
    "mode"           t = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1)   (SD3's mode sampling with heavy tails,
                                                                         s in [-1, 2 / (pi - 2)]; SD3 uses 1.29)

t is kept in [eps, 1 - eps] (loss.eps), where the velocity target and both conversions stay finite.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.discrete import mean_flat, read_batch
from diffusion_jax.objectives.dsm import noise_and_predict

TIME_SAMPLINGS = ("uniform", "logit_normal", "mode")
FLOW_PREDICTIONS = ("flow", "eps", "x0")       # "v" (Salimans & Ho) and "score" assume other processes


@dataclasses.dataclass(frozen=True)
class FlowLossConfig:
    prediction: str = "flow"
    time_sampling: str = "uniform"
    logit_mean: float = 0.0        # logit_normal's m
    logit_std: float = 1.0         # logit_normal's s
    mode_scale: float = 1.29       # mode's s
    eps: float = 1e-5
    cond_drop_prob: float = 0.0

    def validate(self) -> None:
        if self.prediction not in FLOW_PREDICTIONS:
            raise ValueError(f"loss.prediction={self.prediction!r}: schedule.kind='flow' trains one of "
                             f"{FLOW_PREDICTIONS} (velocity, noise or data)")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"loss.time_sampling={self.time_sampling!r} is unknown; choose from {TIME_SAMPLINGS}")
        if not (self.logit_std > 0 and math.isfinite(self.logit_mean)):
            raise ValueError(f"loss.logit_std={self.logit_std} must be > 0 and loss.logit_mean finite")
        if not -1.0 <= self.mode_scale <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"loss.mode_scale={self.mode_scale} must be in [-1, 2 / (pi - 2)] (SD3, eq. 20), where "
                             "the mode map is monotone")
        if not 0.0 < self.eps < 0.5:
            raise ValueError(f"loss.eps={self.eps} must be in (0, 0.5)")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"loss.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")


def sample_time(cfg: FlowLossConfig, key, shape) -> jax.Array:
    """t ~ pi (module doc) in [eps, 1 - eps], float32 of `shape`."""
    if cfg.time_sampling == "logit_normal":
        t = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, shape))
    else:
        t = jax.random.uniform(key, shape)
        if cfg.time_sampling == "mode":
            t = 1.0 - t - cfg.mode_scale * (jnp.cos(0.5 * jnp.pi * t) ** 2 - 1.0 + t)
    return jnp.clip(t, cfg.eps, 1.0 - cfg.eps)


def flow_matching_loss(apply_fn: Callable, process, cfg: FlowLossConfig, params, batch, key, *,
                       num_classes: int | None = None, train: bool = True):
    """Monte-Carlo estimate of L(theta) (module doc) on one batch.

    apply_fn(params, x_t, t_net (B,), y=..., train=..., dropout_key=...) -> (B, H, W, C) prediction of kind
    cfg.prediction, t_net = process.network_time(t). batch: {"image": (B, H, W, C) float, optional "label": (B,) int,
    optional "noise": (B, H, W, C) float, the eps coupled to each image (reflow's pairs, `data/pairs.py`; drawn
    independently when absent)}.
    Returns (scalar loss, {"loss", "mse"}): both the velocity MSE per pixel, batch mean.
    """
    k_t, k_z, k_drop, k_cond = jax.random.split(key, 4)
    x0, cond = read_batch(batch, k_cond, num_classes, cfg.cond_drop_prob)
    t = sample_time(cfg, k_t, (x0.shape[0],))
    if "noise" in batch:   # a coupling (reflow): the noise each image was drawn from
        z = jnp.asarray(batch["noise"], x0.dtype)
        if z.shape != x0.shape:
            raise ValueError(f"batch['noise'] must have the images' shape {x0.shape}, got {z.shape}")
    else:
        z = jax.random.normal(k_z, x0.shape, x0.dtype)
    x0_hat, eps_hat = noise_and_predict(apply_fn, process, params, x0, z, t, cond, cfg.prediction, train, k_drop)
    mse = mean_flat(((eps_hat - x0_hat) - (z - x0)) ** 2)
    loss = jnp.mean(mse)
    return loss, {"loss": loss, "mse": loss}
