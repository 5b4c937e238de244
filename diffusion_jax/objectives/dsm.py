"""Continuous-time denoising score matching for the SDEs of `diffusion_jax.process.sde` (VP, sub-VP, VE, EDM).

Song et al. 2021 ("Score-Based Generative Modeling through SDEs", eq. 7), with x_t = alpha(t) x_0 + sigma(t) z:

    J(theta; lambda) = E_{t ~ U(eps, T)} lambda(t) E_{x_0, z} || s_theta(x_t, t) - grad log p_0t(x_t | x_0) ||^2,
    grad log p_0t(x_t | x_0) = -(x_t - alpha x_0) / sigma^2 = -z / sigma,

written on the noise, sigma^2 ||s_theta + z / sigma||^2 = ||eps_hat - z||^2 with eps_hat = -sigma s_theta, as

    J = E_t [ lambda(t) / sigma(t)^2 ] ||eps_hat - z||^2          (per pixel: averaged over the data dimensions)

so score_sde's lambda(t) / sigma^2 is the w(log_snr) of `weighting.py`, the one vocabulary of every objective:

    weighting "snr"         lambda = sigma^2, w = 1   (score_sde's default; the eps-MSE at uniform t)
    weighting "likelihood"  lambda = g^2, w = g^2 / sigma^2 = -d log_snr / dt  (Song, Durkan, Murray & Ermon 2021,
                            "Maximum Likelihood Training of Score-Based Diffusion Models", Thm. 1: KL(p_0 || p_theta^SDE)
                            <= J_SM(theta; g^2) + KL(p_T || pi), and 1/2 (T - eps) J(g^2), summed over dimensions, is
                            J_SM up to a theta-free constant)
    simple, const, max_snr, min_snr, v   as for discrete schedules (simple: the MSE of the network's own target)

Importance sampling for the likelihood weighting (their sec. 5): sample t with density p(t) = g^2 / (sigma^2 Z) and
weight by lambda / (p (T - eps)) = Z / (T - eps), which keeps the mean of J. Since d sigma^2/dt = 2 f sigma^2 + g^2 and
d log alpha / dt = f, every SDE here has

    g^2 / sigma^2 = d log sigma^2 / dt - 2 d log alpha / dt = -d log_snr / dt,

so the CDF is Lambda(t) = log_snr(eps) - log_snr(t), Z = Lambda(T), and p(t) is log-SNR uniform on
[log_snr(T), log_snr(eps)]: t = sde.t_of_log_snr(log_snr(eps) - u), u ~ U(0, Z), in closed form. (VP written out:
B(t) = log1p(expm1(B(eps)) e^u), the inverse of score_flow's `likelihood_importance_cum_weight`, which it inverts
by bisection.)

The network apply_fn(params, x_t, sde.network_time(t), ...) predicts `prediction` (eps | score | x0 | v; v for VP
only), converted to eps_hat with `param.to_x0_eps`; the loss is w ||eps_hat - z||^2, the same as the weighted MSE of
the network's own target. `check_output` is shared with edm.py and vdm.py
(`losses.read_batch` with every loss).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.objectives import param
from diffusion_jax.objectives import weighting as weightings
from diffusion_jax.objectives.discrete import mean_flat, read_batch
from diffusion_jax.process.sde import SDE


# ------------------------------------------------------------------------------------ shared batch handling
def check_output(out, x0) -> None:
    """The network output must have the data's shape (a mismatch would broadcast silently in a squared error)."""
    if tuple(out.shape) != tuple(x0.shape):
        raise ValueError(f"apply_fn returned shape {tuple(out.shape)} for inputs of shape {tuple(x0.shape)}; "
                         "expected the same shape (do model.in_channels and out_channels fit the data?)")


def noise_and_predict(apply_fn, process, params, x0, z, t, cond: dict, prediction: str, train: bool, dropout_key):
    """(x0_hat, eps_hat) of the network at x_t = alpha(t) x0 + sigma(t) z, t (B,): apply_fn(params, x_t,
    process.network_time(t), **cond, train=..., dropout_key=...) read as `prediction` (`param.to_x0_eps`)."""
    bshape = (-1,) + (1,) * (x0.ndim - 1)
    alpha, sigma = process.alpha(t).reshape(bshape), process.sigma(t).reshape(bshape)
    xt = alpha * x0 + sigma * z
    out = apply_fn(params, xt, process.network_time(t), **cond, train=train, dropout_key=dropout_key)
    check_output(out, x0)
    return param.to_x0_eps(prediction, out, xt, alpha, sigma)


# ----------------------------------------------------------------------------- likelihood importance sampling
def likelihood_cdf(sde: SDE, t, eps: float = 1e-5):
    """Lambda(t) = int_eps^t g(s)^2 / sigma(s)^2 ds = log_snr(eps) - log_snr(t) (unnormalised CDF of p(t))."""
    return sde.log_snr(eps) - sde.log_snr(t)


def importance_density(sde: SDE, t, eps: float = 1e-5):
    """p(t) = g(t)^2 / (sigma(t)^2 Z) on [eps, T], Z = Lambda(T)."""
    return sde.g2(t) / sde.sigma(t) ** 2 / likelihood_cdf(sde, sde.t_max, eps)


def sample_importance_time(sde: SDE, key, shape, eps: float = 1e-5):
    """t ~ p(t) by the inverse CDF: t = t_of_log_snr(log_snr(eps) - u), u ~ U(0, Z). Returns `shape` float32."""
    z = likelihood_cdf(sde, sde.t_max, eps)
    u = jax.random.uniform(key, shape, minval=0.0, maxval=z)
    return jnp.clip(sde.t_of_log_snr(sde.log_snr(eps) - u), eps, sde.t_max)


# ---------------------------------------------------------------------------------------------- the loss
@dataclasses.dataclass(frozen=True)
class DSMConfig:
    prediction: str = "score"          # what the network predicts: eps | score | x0 | v (VP only)
    weighting: str = "snr"             # objectives.weighting.WEIGHTINGS (snr: lambda = sigma^2; likelihood: g^2)
    importance_sampling: bool = False  # likelihood weighting only: t ~ g^2 / sigma^2 (module docstring)
    snr_gamma: float = 5.0             # gamma of min_snr / max_snr
    eps: float = 1e-5                  # t ~ U(eps, T) (score_sde's training eps)
    cond_drop_prob: float = 0.0        # label dropout for classifier-free guidance

    def validate(self) -> None:
        if self.prediction not in param.PREDICTIONS:
            raise ValueError(f"loss.prediction={self.prediction!r} is unknown; choose from {param.PREDICTIONS}")
        weightings.check_weighting(self.weighting, continuous=True)
        if self.importance_sampling and self.weighting != "likelihood":
            raise ValueError("loss.importance_sampling=True needs loss.weighting='likelihood'")
        if not self.eps > 0:
            raise ValueError(f"loss.eps must be > 0, got {self.eps}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"loss.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")


def sample_time_and_weight(sde: SDE, cfg: DSMConfig, key, shape):
    """(t, w): times and the weight w = lambda(t) / (sigma^2 q(t) (T - eps)) on ||eps_hat - z||^2, q the density t
    is drawn from, so E[w ||eps_hat - z||^2] = J(theta; lambda) for every choice."""
    cfg.validate()
    if cfg.importance_sampling:
        t = sample_importance_time(sde, key, shape, cfg.eps)
        return t, jnp.full(shape, likelihood_cdf(sde, sde.t_max, cfg.eps) / (sde.t_max - cfg.eps))
    t = jax.random.uniform(key, shape, minval=cfg.eps, maxval=sde.t_max)
    likelihood = cfg.weighting == "likelihood"     # g^2 / sigma^2 = -d log_snr / dt (module doc)
    w = weightings.eps_weight(cfg.weighting, sde.log_snr(t), prediction=cfg.prediction, gamma=cfg.snr_gamma,
                              neg_dlogsnr_dt=sde.g2(t) / sde.sigma(t) ** 2 if likelihood else None)
    return t, w


def dsm_loss(apply_fn: Callable, sde: SDE, cfg: DSMConfig, params, batch, key, *, num_classes: int | None = None,
             train: bool = True):
    """Monte-Carlo estimate of J(theta; lambda) (module docstring) on one batch.

    apply_fn(params, x_t, t_net (B,), y=..., train=..., dropout_key=...) -> (B, H, W, C) prediction of kind
    cfg.prediction, t_net = sde.network_time(t). batch: {"image": (B, H, W, C) float, optional "label": (B,) int}.
    Returns (scalar loss, {"loss", "mse"}): "mse" is the unweighted ||eps_hat - z||^2 per pixel, batch means.
    """
    k_t, k_z, k_drop, k_cond = jax.random.split(key, 4)
    x0, cond = read_batch(batch, k_cond, num_classes, cfg.cond_drop_prob)
    t, w = sample_time_and_weight(sde, cfg, k_t, (x0.shape[0],))
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    _, eps_hat = noise_and_predict(apply_fn, sde, params, x0, z, t, cond, cfg.prediction, train, k_drop)
    mse = mean_flat((eps_hat - z) ** 2)
    loss = jnp.mean(w * mse)
    return loss, {"loss": loss, "mse": jnp.mean(mse)}
