"""EDM preconditioning and training loss (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Table 1 and section 5).

With x = y + n, n ~ N(0, sigma^2 I) (alpha = 1, sigma(t) = t: `sde.EDMSchedule`) the denoiser is the network F wrapped
as (Table 1, "Network and preconditioning", column "ours")

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))          (eq. 7)
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2)         c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_d^2)             c_noise = ln(sigma) / 4

and it is trained with (Table 1, "Training"; eq. 8)

    E_{sigma, y, n} [ lambda(sigma) ||D(y + n; sigma) - y||^2 ],    ln(sigma) ~ N(P_mean, P_std^2) = N(-1.2, 1.2^2),
    lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2  =  1 / c_out(sigma)^2,

so that the effective target of F, (y - c_skip (y + n)) / c_out, has unit weight (eq. 8's lambda c_out^2 = 1).

At sampling time D is the network of prediction "edm" (`samplers.wrapper`): `edm_denoise_fn` gives the
denoise_fn(x, sigma) that `samplers.run_sampler(..., prediction="edm")` expects.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.discrete import mean_flat, read_batch
from diffusion_jax.objectives.dsm import check_output
from diffusion_jax.process.sde import EDMSchedule


class EDMPrecond(NamedTuple):
    """The four preconditioning coefficients at noise level sigma (each of sigma's shape)."""

    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def edm_precond(sigma, sigma_data: float = 0.5) -> EDMPrecond:
    """Karras et al. 2022, Table 1: c_skip, c_out, c_in, c_noise at sigma (scalar or array, sigma > 0)."""
    sigma = jnp.asarray(sigma, jnp.result_type(float))
    var = sigma ** 2 + sigma_data ** 2
    return EDMPrecond(c_skip=sigma_data ** 2 / var,
                      c_out=sigma * sigma_data * jax.lax.rsqrt(var),
                      c_in=jax.lax.rsqrt(var),
                      c_noise=jnp.log(sigma) / 4.0)


def edm_loss_weight(sigma, sigma_data: float = 0.5):
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (Table 1), = 1 / c_out(sigma)^2."""
    sigma = jnp.asarray(sigma, jnp.result_type(float))
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_sigma(key, shape, p_mean: float = -1.2, p_std: float = 1.2):
    """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2) (Table 1, p_train). Returns `shape` float32."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape))


def edm_denoise(apply_fn: Callable, params, x, sigma, sigma_data: float = 0.5, *, y=None, train: bool = False,
                dropout_key=None, **cond):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (eq. 7) for x (B, H, W, C) and sigma scalar or (B,).

    F is apply_fn(params, c_in x, c_noise (B,), y=..., train=..., dropout_key=...) (and the other conditioning
    keywords `cond` that are not None: context=... for a cross-attention network, control=... for a ControlNet).
    Returns (B, H, W, C): the
    estimate of the clean y, in data units.
    """
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype).reshape(-1), (x.shape[0],))
    c = edm_precond(sigma.reshape((-1,) + (1,) * (x.ndim - 1)), sigma_data)
    extra = {k: v for k, v in cond.items() if v is not None}
    f = apply_fn(params, c.c_in * x, c.c_noise.reshape(-1), y=y, train=train, dropout_key=dropout_key, **extra)
    check_output(f, x)
    return c.c_skip * x + c.c_out * f


def edm_denoise_fn(apply_fn: Callable, params, sigma_data: float = 0.5, y=None):
    """denoise_fn(x, sigma) -> D(x; sigma) for `samplers.run_sampler(..., prediction="edm")` (sigma (B,))."""
    return lambda x, sigma: edm_denoise(apply_fn, params, x, sigma, sigma_data, y=y, train=False)


@dataclasses.dataclass(frozen=True)
class EDMLossConfig:
    p_mean: float = -1.2             # ln(sigma) ~ N(p_mean, p_std^2) (Table 1)
    p_std: float = 1.2
    cond_drop_prob: float = 0.0      # label dropout for classifier-free guidance (Ho & Salimans 2022)

    def validate(self) -> None:
        if not self.p_std > 0:
            raise ValueError(f"loss.p_std must be > 0, got {self.p_std}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"loss.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")


def edm_loss(apply_fn: Callable, schedule: EDMSchedule, cfg: EDMLossConfig, params, batch, key, *,
             num_classes: int | None = None, train: bool = True):
    """Monte-Carlo estimate of EDM's loss (eq. 8 with Table 1's p_train and lambda) on one batch.

    sigma_d is schedule.sigma_data (the one the sampler's preconditioning uses too). apply_fn and batch as in
    `losses.diffusion_loss`. The squared error is averaged over pixels (EDM sums it; the mean keeps the loss O(1):
    1 per pixel at the optimum for N(0, sigma_d^2) data). Returns (scalar, {"loss", "mse"}), "mse" being the
    unweighted ||D - y||^2 per pixel, both batch means.
    """
    cfg.validate()
    k_sigma, k_n, k_drop, k_cond = jax.random.split(key, 4)
    x0, cond = read_batch(batch, k_cond, num_classes, cfg.cond_drop_prob)
    sigma = sample_sigma(k_sigma, (x0.shape[0],), cfg.p_mean, cfg.p_std).astype(x0.dtype)
    n = sigma[:, None, None, None] * jax.random.normal(k_n, x0.shape, x0.dtype)
    denoised = edm_denoise(apply_fn, params, x0 + n, sigma, schedule.sigma_data, **cond, train=train,
                           dropout_key=k_drop)
    mse = mean_flat((denoised - x0) ** 2)
    loss = jnp.mean(edm_loss_weight(sigma, schedule.sigma_data) * mse)
    return loss, {"loss": loss, "mse": jnp.mean(mse)}
