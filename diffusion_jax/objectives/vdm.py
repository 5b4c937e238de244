"""VDM's continuous-time variational bound (Kingma, Salimans, Poole & Ho 2021, "Variational Diffusion Models").

Noise schedule gamma(t) = -log SNR(t), monotone increasing on [0, 1]; variance preserving:

    z_t = alpha_t x + sigma_t eps,    alpha_t^2 = sigmoid(-gamma(t)),    sigma_t^2 = sigmoid(gamma(t)).

For data x on V = 256 levels, -log p(x) <= VLB(x) = prior + reconstruction + diffusion loss, with

    prior           KL(q(z_1 | x) || N(0, I)) = 1/2 sum_i (alpha_1^2 x_i^2 + sigma_1^2 - log sigma_1^2 - 1)
    reconstruction  E_{q(z_0 | x)} [-log p(x | z_0)],  p(x_i | z_0) proportional to q(z_0,i | x_i) over the V levels
                    (VDM's factorised decoder: logits -1/2 (z_0,i / alpha_0 - v_k)^2 e^{-gamma_0}, v_k the levels)
    diffusion       L_inf(x) = -1/2 E_eps int_0^1 SNR'(t) ||x - x_hat(z_t; t)||^2 dt
                             =  1/2 E_{eps, t ~ U(0, 1)} [ gamma'(t) e^{-gamma(t)} ||x - x_hat(z_t; t)||^2 ]     (x-space)
                             =  1/2 E_{eps, t ~ U(0, 1)} [ gamma'(t) ||eps - eps_hat(z_t; t)||^2 ]                (eps-space)

(SNR' = -gamma' e^{-gamma} and x - x_hat = (sigma / alpha)(eps_hat - eps), (sigma / alpha)^2 = e^{gamma}). All three
are summed over pixels, in nats, and reported in bits per dimension (divided by D ln 2). t is drawn by VDM's
low-discrepancy ("antithetic") sampler t_i = (u + i / B) mod 1, u ~ U(0, 1), or i.i.d. uniform.

Schedules (`process/vdm.py`): `LinearGamma` (fixed) and `MonotoneGamma` (learned), both `schedule(gamma_params, t)`;
`init(key)` gives the params pytree ({} for the fixed one) that `vdm_loss` takes next to the network's params.

Training (schedule.kind = "vdm", schedule.gamma = linear | learned): a learned gamma lives next to the U-Net in one
module, `VDMNetwork` (params {"net": ..., "gamma": ...}), so the optimizer, EMA and checkpoints treat it as any other
parameter. Sampling, editing and likelihood use `process.vdm.VDMSchedule`, the process protocol for a gamma and its
params (VP with beta(t) = gamma'(t) sigmoid(gamma(t))).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.objectives import param
from diffusion_jax.objectives.discrete import read_batch
from diffusion_jax.objectives.dsm import check_output
from diffusion_jax.process.vdm import alpha_sigma


def gamma_and_derivative(schedule, gamma_params, t):
    """(gamma(t), gamma'(t)) for t (B,), by one forward-mode pass (each gamma(t_i) depends on t_i only)."""
    return jax.jvp(lambda s: schedule(gamma_params, s), (t,), (jnp.ones_like(t),))


def sample_times(key, n: int, antithetic: bool = True):
    """n times in [0, 1): VDM's low-discrepancy t_i = (u + i / n) mod 1, u ~ U(0, 1), or i.i.d. uniform."""
    if antithetic:
        return jnp.mod(jax.random.uniform(key) + jnp.arange(n) / n, 1.0)
    return jax.random.uniform(key, (n,))


# --------------------------------------------------------------------------------------------- VLB terms
def levels(vocab_size: int):
    """The data's V levels v_k = 2k / (V - 1) - 1 in [-1, 1] (this library's image scaling, k / 127.5 - 1)."""
    return jnp.linspace(-1.0, 1.0, vocab_size)


def level_index(x, vocab_size: int):
    """k of the level nearest to x (int32, x's shape)."""
    return jnp.clip(jnp.round((x + 1.0) * (vocab_size - 1) / 2.0), 0, vocab_size - 1).astype(jnp.int32)


def prior_kl(x, gamma_1):
    """KL(q(z_1 | x) || N(0, I)) per example, nats: 1/2 sum (alpha_1^2 x^2 + sigma_1^2 - log sigma_1^2 - 1)."""
    var_1 = jax.nn.sigmoid(gamma_1)
    kl = 0.5 * ((1.0 - var_1) * x ** 2 + var_1 - jnp.log(var_1) - 1.0)
    return jnp.sum(kl.reshape(x.shape[0], -1), axis=-1)


def reconstruction_nll(x, gamma_0, eps_0, vocab_size: int = 256):
    """-log p(x | z_0) per example, nats, at z_0 = alpha_0 x + sigma_0 eps_0, x on `levels(vocab_size)`."""
    z0_rescaled = x + jnp.exp(0.5 * gamma_0) * eps_0                  # z_0 / alpha_0; sigma_0 / alpha_0 = e^{gamma_0/2}
    logits = -0.5 * (z0_rescaled[..., None] - levels(vocab_size)) ** 2 * jnp.exp(-gamma_0)
    k = level_index(x, vocab_size)[..., None]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), k, axis=-1)
    return -jnp.sum(logp.reshape(x.shape[0], -1), axis=-1)


def diffusion_term(dgamma_t, eps, eps_hat):
    """L_inf per example, nats: 1/2 gamma'(t) ||eps - eps_hat||^2 (a one-sample estimate at t)."""
    return 0.5 * dgamma_t * jnp.sum(((eps - eps_hat) ** 2).reshape(eps.shape[0], -1), axis=-1)


# ---------------------------------------------------------------------------------------------- the loss
@dataclasses.dataclass(frozen=True)
class VDMLossConfig:
    prediction: str = "eps"                 # what the network predicts: eps | x0 | v (VDM: eps)
    antithetic_time_sampling: bool = True   # VDM's low-discrepancy sampler
    vocab_size: int = 256                   # data levels (8-bit images)
    time_scale: float = 1000.0              # t_net = time_scale (gamma(t) - gamma_min) / (gamma_max - gamma_min)
    cond_drop_prob: float = 0.0

    def validate(self) -> None:
        if self.prediction not in ("eps", "x0", "v"):
            raise ValueError(f"loss.prediction={self.prediction!r} is unknown; choose from ('eps', 'x0', 'v')")
        if self.vocab_size < 2:
            raise ValueError(f"loss.vocab_size must be >= 2, got {self.vocab_size}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"loss.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")


def vdm_loss(apply_fn: Callable, schedule, cfg: VDMLossConfig, params, gamma_params, batch, key, *,
             num_classes: int | None = None, train: bool = True):
    """Monte-Carlo estimate of the VLB in bits per dimension (module docstring) on one batch.

    schedule(gamma_params, t) -> gamma(t) (`LinearGamma` with gamma_params = {}, or `MonotoneGamma`); differentiate
    with respect to (params, gamma_params) to learn both. apply_fn(params, z_t, t_net (B,), y=..., train=...,
    dropout_key=...) -> (B, H, W, C) prediction of kind cfg.prediction, t_net = VDM's normalised gamma (times
    cfg.time_scale); for LinearGamma that is time_scale t. batch["image"]: (B, H, W, C) on `levels(vocab_size)`.
    Returns (bpd, {"loss", "bpd", "diff_bpd", "prior_bpd", "recon_bpd", "gamma_0", "gamma_1", "mse"}), batch means.
    """
    cfg.validate()
    k_t, k_eps, k_0, k_drop, k_cond = jax.random.split(key, 5)
    x, cond = read_batch(batch, k_cond, num_classes, cfg.cond_drop_prob)
    if "context" in cond:
        raise ValueError("schedule.kind='vdm' trains a VLB of pixel data on discrete levels; a batch with "
                         "'context' (latents of a text-conditioned run) needs another schedule.kind")
    x = levels(cfg.vocab_size)[level_index(x, cfg.vocab_size)]         # the VLB is for data on the V levels
    gamma_0, gamma_1 = schedule(gamma_params, 0.0), schedule(gamma_params, 1.0)

    t = sample_times(k_t, x.shape[0], cfg.antithetic_time_sampling)
    gamma_t, dgamma_t = gamma_and_derivative(schedule, gamma_params, t)
    alpha, sigma = (a.reshape((-1,) + (1,) * (x.ndim - 1)) for a in alpha_sigma(gamma_t))
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    z_t = alpha * x + sigma * eps
    t_net = cfg.time_scale * (gamma_t - schedule.gamma_min) / (schedule.gamma_max - schedule.gamma_min)
    out = apply_fn(params, z_t, t_net, **cond, train=train, dropout_key=k_drop)
    check_output(out, x)
    _, eps_hat = param.to_x0_eps(cfg.prediction, out, z_t, alpha, sigma)

    to_bpd = 1.0 / (math.prod(x.shape[1:]) * math.log(2.0))
    diff = jnp.mean(diffusion_term(dgamma_t, eps, eps_hat)) * to_bpd
    prior = jnp.mean(prior_kl(x, gamma_1)) * to_bpd
    recon = jnp.mean(reconstruction_nll(x, gamma_0, jax.random.normal(k_0, x.shape, x.dtype), cfg.vocab_size)) * to_bpd
    bpd = diff + prior + recon
    return bpd, {"loss": bpd, "bpd": bpd, "diff_bpd": diff, "prior_bpd": prior, "recon_bpd": recon,
                 "gamma_0": gamma_0, "gamma_1": gamma_1, "mse": jnp.mean((eps - eps_hat) ** 2)}


# ------------------------------------------------------------------------------ the network with a learned gamma
class VDMNetwork(nnx.Module):
    """A denoising network plus the params of a learned gamma, trained together: pure params {"net": <the
    network's>, "gamma": MonotoneGamma params}. Calling it calls the network (gamma is read by the loss and
    `VDMSchedule`, never by the forward pass)."""

    def __init__(self, net: nnx.Module, gamma_params: dict):
        self.net = net
        self.gamma = nnx.data(jax.tree.map(nnx.Param, gamma_params))

    def __call__(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def gamma_params_of(params) -> dict:
    """The gamma params inside a `VDMNetwork`'s params, or {} for a plain network (fixed gamma)."""
    return params["gamma"] if isinstance(params, dict) and set(params) == {"net", "gamma"} else {}
