"""Training losses for discrete-time diffusion models.

The MSE loss is the network's own target at uniform timesteps, weighted by a weighting of `weighting.py` (one
vocabulary for every objective: w(lambda) on the eps error, as a function of the log-SNR): simple, const, snr,
max_snr, min_snr (Hang et al. 2023) or v.

loss_type="hybrid" adds the variational bound with a frozen mean for a learned variance (Nichol & Dhariwal
2021, L_hybrid = L_simple + lambda L_vlb with their factor T/1000); loss_type="vlb" trains on L_vlb alone.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from diffusion_jax.objectives import param
from diffusion_jax.objectives import weighting as weightings
from diffusion_jax.process.discrete import DiscreteSchedule, _bcast, q_posterior, q_sample
from diffusion_jax.validate import check_images, check_labels

LOSS_TYPES = ("mse", "hybrid", "vlb")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss of config.loss. Discrete schedules use all but the continuous-time fields; schedule.kind
    vp / subvp / ve train with DSM (`dsm.py`: prediction eps | score | x0 | v, any weighting of `weighting.py`,
    importance_sampling, eps); kind edm with EDM's loss (prediction "edm", p_mean, p_std); kind flow with flow
    matching (`flow.py`: prediction flow | eps | x0, time_sampling, logit_mean / logit_std, mode_scale, eps)."""
    prediction: str = "eps"          # what the network predicts: eps | x0 | v (| score: DSM; edm: EDM)
    weighting: str = "simple"        # objectives.weighting.WEIGHTINGS (likelihood: continuous time only)
    snr_gamma: float = 5.0           # gamma of min_snr / max_snr
    loss_type: str = "mse"           # mse | hybrid | vlb (continuous time: mse)
    cond_drop_prob: float = 0.0      # label dropout for classifier-free guidance (Ho & Salimans 2022)
    eps: float = 1e-5                # DSM: t ~ U(eps, T) (score_sde's training eps)
    importance_sampling: bool = False  # DSM with likelihood weighting: t ~ g^2 / sigma^2 (Song et al. 2021b)
    p_mean: float = -1.2             # EDM: ln sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    time_sampling: str = "uniform"   # flow: t ~ uniform | logit_normal | mode (SD3; objectives/flow.py)
    logit_mean: float = 0.0          # flow, logit_normal: t = sigmoid(logit_mean + logit_std n)
    logit_std: float = 1.0
    mode_scale: float = 1.29         # flow, mode: SD3's heavy-tail scale s

    def validate(self, learn_sigma: bool) -> None:
        """The discrete-time (DDPM) fields; `objectives.build.validate_loss` checks the continuous kinds."""
        if self.prediction not in ("eps", "x0", "v"):
            raise ValueError(f"loss.prediction={self.prediction!r} is unknown; choose from ('eps', 'x0', 'v')")
        weightings.check_weighting(self.weighting, continuous=False)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss.loss_type={self.loss_type!r} is unknown; choose from {LOSS_TYPES}")
        if self.loss_type == "hybrid" and not learn_sigma:
            raise ValueError("loss.loss_type='hybrid' needs a learned variance: set model.learn_sigma=True")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"loss.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.snr_gamma <= 0:
            raise ValueError(f"loss.snr_gamma must be > 0, got {self.snr_gamma}")


def mean_flat(x):
    """Mean over all but the batch axis: (B, ...) -> (B,)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------------
# Variational bound terms (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021 sec. 3.1), in bits per dimension.
# ----------------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of data in [-1, 1] quantised to 256 bins of width 2/255 under N(mean, exp(log_scale)^2).

    Edge bins integrate to -inf / +inf (Ho et al. 2020 sec. 3.3). Elementwise, in nats.
    """
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = jax.scipy.special.ndtr(inv_std * (centered + 1.0 / 255.0))
    cdf_min = jax.scipy.special.ndtr(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def model_log_variance(schedule: DiscreteSchedule, t, var_out, xt):
    """Learned interpolation log Sigma = frac log beta_t + (1 - frac) log beta_tilde_t, frac = (v + 1) / 2."""
    min_log = _bcast(schedule.posterior_log_variance_clipped[t], xt)
    max_log = _bcast(jnp.log(schedule.betas[t]), xt)
    frac = (var_out + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def vlb_term(schedule: DiscreteSchedule, x0, xt, t, x0_hat, model_logvar):
    """L_{t-1} per example in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the
    decoder NLL -log p(x_0 | x_1) for t = 0. Returns (B,)."""
    true_mean, _, true_logvar = q_posterior(schedule, x0, xt, t)
    model_mean, _, _ = q_posterior(schedule, x0_hat, xt, t)
    kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


# ----------------------------------------------------------------------------------------------------
# The training loss
# ----------------------------------------------------------------------------------------------------
def read_batch(batch, key, num_classes: int | None, cond_drop_prob: float) -> tuple[jax.Array, dict]:
    """(x0 (B, H, W, C), cond) of a batch {"image", optional "label", optional "context" + "null_context", optional
    "control"}, as every loss reads it. cond holds the network's conditioning keyword arguments: {"y": labels (B,) or
    None} plus {"context": (B, L, D)} for a text-conditioned model (latent diffusion, `data/latents.py`) and
    {"control": (B, S, S, k)} for a ControlNet (`data.conditions.ControlSource`).

    Classifier-free guidance training (Ho & Salimans 2022): with probability cond_drop_prob an example's label
    becomes the null class num_classes and its context the null context (the empty caption's embedding,
    batch["null_context"] (B, L, D)), the same examples for both.
    """
    if not isinstance(batch, Mapping) or "image" not in batch:
        got = f"keys {sorted(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"batch must be a dict with 'image' (B, H, W, C) float and optionally 'label' (B,) int, "
                         f"got {got}")
    x0 = check_images(batch["image"], "batch['image']", value_range=None)
    B = x0.shape[0]
    drop = jax.random.bernoulli(key, cond_drop_prob, (B,)) if cond_drop_prob > 0 else None
    y = batch.get("label") if num_classes is not None else None
    if y is not None:  # label == num_classes is the null (unconditional) class
        check_labels(y, "batch['label']", num=B, num_classes=num_classes + 1)
        if drop is not None:
            y = jnp.where(drop, num_classes, y)
    cond = {"y": y}
    context = batch.get("context")
    if context is not None:
        if context.ndim != 3 or context.shape[0] != B:
            raise ValueError(f"batch['context'] must be ({B}, L, D) embeddings, got shape {tuple(context.shape)}")
        if drop is not None:
            null = batch.get("null_context")
            if null is None or tuple(null.shape) != tuple(context.shape):
                raise ValueError(f"loss.cond_drop_prob={cond_drop_prob} drops captions: batch['null_context'] "
                                 f"{tuple(context.shape)} (the empty caption's embedding) is needed")
            context = jnp.where(drop[:, None, None], null, context)
        cond["context"] = context
    control = batch.get("control")
    if control is not None:   # a ControlNet's control image (data.conditions); kept when the label is dropped
        if control.ndim != 4 or control.shape[0] != B:
            raise ValueError(f"batch['control'] must be ({B}, H, W, k) control images, got shape "
                             f"{tuple(control.shape)}")
        cond["control"] = control
    return x0, cond


def diffusion_loss(apply_fn: Callable, schedule: DiscreteSchedule, cfg: LossConfig, params, batch, key, *,
                   learn_sigma: bool = False, num_classes: int | None = None, train: bool = True):
    """Monte-Carlo estimate of the loss on one batch.

    apply_fn(params, x_t, t, y=..., [context=...,] train=..., dropout_key=...) -> (B, H, W, C or 2C) output.
    batch: {"image": (B, H, W, C) float32 in [-1, 1], optional "label": (B,) int32, optional "context"
    (B, L, D) with "null_context" (`read_batch`)}.
    Returns (scalar loss, {"loss": ..., "mse": ..., ["vlb": ...]}), all per-batch means.
    Under jit the batch's shapes and dtypes are checked (its values were checked where the data entered).
    """
    k_t, k_eps, k_drop, k_cond = jax.random.split(key, 4)
    x0, cond = read_batch(batch, k_cond, num_classes, cfg.cond_drop_prob)
    B, T = x0.shape[0], schedule.num_timesteps
    t = jax.random.randint(k_t, (B,), 0, T)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    xt = q_sample(schedule, x0, t, eps)

    out = apply_fn(params, xt, t, **cond, train=train, dropout_key=k_drop)
    want = x0.shape[:-1] + (x0.shape[-1] * (2 if learn_sigma else 1),)
    if tuple(out.shape) != want:  # a mismatch would broadcast silently in (out - target) ** 2
        raise ValueError(f"apply_fn returned shape {tuple(out.shape)} for batch['image'] of shape {tuple(x0.shape)}; "
                         f"expected {want} (do model.in_channels, out_channels and learn_sigma fit the data?)")
    if learn_sigma:
        out, var_out = jnp.split(out, 2, axis=-1)
    alpha, sigma = _bcast(schedule.alpha(t), x0), _bcast(schedule.sigma(t), x0)
    target = param.from_x0_eps(cfg.prediction, x0, eps, alpha, sigma)
    mse = mean_flat((out - target) ** 2)
    log_snr = jnp.log(jnp.maximum(schedule.snr(t), 1e-8))   # zero-terminal-SNR schedules reach SNR = 0 at T - 1
    w = weightings.target_weight(cfg.weighting, cfg.prediction, log_snr, gamma=cfg.snr_gamma)
    metrics = {"mse": jnp.mean(mse)}

    if cfg.loss_type == "mse":
        loss = jnp.mean(w * mse)
    else:
        if learn_sigma:
            logvar = model_log_variance(schedule, t, var_out, xt)
        else:
            logvar = _bcast(schedule.posterior_log_variance_clipped[t], xt)
        # Hybrid: the VLB only trains the variance, the mean is frozen (Nichol & Dhariwal 2021 sec. 3.1).
        mean_out = jax.lax.stop_gradient(out) if cfg.loss_type == "hybrid" else out
        x0_hat, _ = param.to_x0_eps(cfg.prediction, mean_out, xt, alpha, sigma)
        vlb = vlb_term(schedule, x0, xt, t, x0_hat, logvar)
        metrics["vlb"] = jnp.mean(vlb)
        # Nichol & Dhariwal's factor T/1000 keeps the VLB term from swamping the MSE term.
        loss = jnp.mean(w * mse + vlb * (T / 1000.0)) if cfg.loss_type == "hybrid" else jnp.mean(vlb)
    metrics["loss"] = loss
    return loss, metrics
