"""From a network to the denoiser every solver uses: parameterization, classifier-free guidance, clipping.

    denoiser(x, t, alpha, sigma) -> (x0_hat, eps_hat)      at one level x = alpha x0 + sigma eps of a `Grid`

t, alpha, sigma are scalars (0-d) for the level; x is (B, ...). The network `denoise_fn(x, t)` receives t as a
(B,) float32 array and returns a prediction of kind

    eps, x0, v, score   as in `diffusion_jax.objectives.param` (v assumes alpha^2 + sigma^2 = 1: VP levels only)
    edm                 EDM's D(x_ve; sigma_ve) with x_ve = x / alpha, sigma_ve = sigma / alpha (Karras et al. 2022):
                        it receives (x / alpha, sigma / alpha), not (x, t), and returns x0_hat directly.

Classifier-free guidance (Ho & Salimans 2022) combines the two raw outputs in the prediction space, as diffusers
does with noise_pred:  pred = uncond + w (cond - uncond), then optionally rescales it (Lin et al. 2024, sec. 3.4)
and applies it only inside a noise interval (Kynkaanniemi et al. 2024). The conditional output is
`denoise_fn(x, t)`, the unconditional one `uncond_fn(x, t)` (two calls: it may be another network, as in
autoguidance), or both at once from `pair_fn(x, t) -> (cond, uncond)`, e.g. `batched_pair(net, y, y_null)`,
which evaluates net(x, t, y) once on the doubled batch. Outside the interval only denoise_fn runs (`lax.cond`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.distill import ConsistencyParam
from diffusion_jax.objectives.param import PREDICTIONS, eps_from_x0, to_x0_eps

Denoiser = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
WRAPPER_PREDICTIONS = PREDICTIONS + ("edm",)


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance options.

    scale:    w in pred = uncond + w (cond - uncond) (Ho & Salimans 2022); 1 = off, 0 = unconditional.
    rescale:  phi of Lin et al. 2024 sec. 3.4 (Alg. 2): pred <- phi pred std(cond)/std(pred) + (1 - phi) pred,
              stds per example over all non-batch axes. 0 = off.
    interval: guide only where sigma / alpha is in [lo, hi] (Kynkaanniemi et al. 2024); elsewhere pred = cond.
    """

    scale: float = 1.0
    rescale: float = 0.0
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ValueError(f"guidance.scale must be a finite number, got {self.scale!r}")
        if not (isinstance(self.rescale, (int, float)) and 0 <= self.rescale <= 1):
            raise ValueError(f"guidance.rescale must be in [0, 1], got {self.rescale!r}")
        if self.interval is not None:
            ok = isinstance(self.interval, (tuple, list)) and len(self.interval) == 2
            if not (ok and 0 <= self.interval[0] <= self.interval[1]):
                raise ValueError(f"guidance.interval must be None or (lo, hi), 0 <= lo <= hi, got {self.interval!r}")

    @property
    def active(self) -> bool:
        return self.scale != 1.0


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", sec. 2.3): per example, s = the `ratio` quantile of
    |x0_hat| over all its values, clamped to [1, max_value]; x0_hat <- clip(x0_hat, -s, s) / s (diffusers'
    thresholding=True with dynamic_thresholding_ratio, sample_max_value)."""

    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise ValueError(f"threshold.ratio (dynamic_thresholding_ratio) must be in (0, 1], got {self.ratio!r}")
        if not (isinstance(self.max_value, (int, float)) and self.max_value >= 1):
            raise ValueError(f"threshold.max_value (sample_max_value) must be >= 1, got {self.max_value!r}")

    def __call__(self, x0):
        flat = x0.reshape(x0.shape[0], -1)
        s = jnp.quantile(jnp.abs(flat).astype(jnp.float32), self.ratio, axis=1)      # linear, as torch.quantile
        s = jnp.clip(s, 1.0, self.max_value).reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
        return jnp.clip(x0, -s, s) / s


def predict_x0_eps(out, x, alpha, sigma, prediction: str, clip_denoised, threshold: Threshold | None = None,
                   rederive_eps: bool = True, consistency: ConsistencyParam | None = None):
    """(x0_hat, eps_hat) from a raw output of kind `prediction` (any of WRAPPER_PREDICTIONS; for "edm" the output
    is x0_hat). A consistency model's x0_hat is its consistency function f = c_skip y + c_out x0_hat
    (`objectives.distill.ConsistencyParam`), eps_hat re-derived from it. With clipping, x0_hat is clipped to [-c, c];
    with `threshold` it is dynamically thresholded instead; either way eps_hat is re-derived from it (DDIM / ADM)
    unless rederive_eps=False (diffusers' DDIM without use_clipped_model_output keeps the network's eps_hat)."""
    if prediction == "edm":
        x0, eps = out, eps_from_x0(x, out, alpha, sigma)
    else:
        x0, eps = to_x0_eps(prediction, out, x, alpha, sigma)
    if consistency is not None:
        x0 = consistency(x0, x, alpha, sigma)
        eps = eps_from_x0(x, x0, alpha, sigma)
    if threshold is not None:
        x0 = threshold(x0)
    elif clip_denoised is not None:
        x0 = jnp.clip(x0, -clip_denoised, clip_denoised)
    if (threshold is not None or clip_denoised is not None) and rederive_eps:
        eps = eps_from_x0(x, x0, alpha, sigma)
    return x0, eps


def guide(cond, uncond, scale: float, rescale: float = 0.0):
    """uncond + w (cond - uncond), then Lin et al.'s std rescale with factor phi (Alg. 2)."""
    pred = uncond + scale * (cond - uncond)
    if rescale:
        axes = tuple(range(1, pred.ndim))
        ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.std(pred, axis=axes, keepdims=True)
        pred = pred * (rescale * ratio + (1.0 - rescale))
    return pred


def batched_pair(net, y, y_null):
    """pair_fn(x, t) -> (cond, uncond) from one call net(concat[x, x], concat[t, t], concat[y, y_null])."""
    def pair_fn(x, t):
        out = net(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, y_null]))
        return jnp.split(out, 2)
    return pair_fn


def make_denoiser(denoise_fn, prediction: str, *, clip_denoised: float | None = None,
                  guidance: Guidance | None = None, uncond_fn=None, pair_fn=None,
                  learned_variance: bool = False, threshold: Threshold | None = None,
                  rederive_eps: bool = True, consistency: ConsistencyParam | None = None) -> Denoiser:
    """The denoiser(x, t, alpha, sigma) -> (x0_hat, eps_hat) of a network `denoise_fn(x, t)` (see module doc).

    With guidance.scale != 1 exactly one of uncond_fn(x, t) / pair_fn(x, t) -> (cond, uncond) is required.
    learned_variance: the network returns 2 C channels, [prediction, v] (improved DDPM); the denoiser returns
    (x0_hat, eps_hat, v), guiding the prediction half only and keeping the conditional v.
    threshold: dynamic thresholding of x0_hat (`Threshold`) in place of clip_denoised; rederive_eps: see
    `predict_x0_eps`; consistency: a consistency model's skip / out parameterization (`predict_x0_eps`). Never call
    it at a clean level (sigma = 0): eps_hat would divide by zero.
    """
    if prediction not in WRAPPER_PREDICTIONS:
        raise ValueError(f"sampler.prediction={prediction!r} is unknown; choose from {WRAPPER_PREDICTIONS}")
    if clip_denoised is not None and not clip_denoised > 0:
        raise ValueError(f"sampler.clip_denoised must be None or > 0, got {clip_denoised!r}")
    if guidance is not None and not isinstance(guidance, Guidance):
        raise ValueError(f"guidance must be a Guidance or None, got {type(guidance).__name__}")
    if threshold is not None and not isinstance(threshold, Threshold):
        raise ValueError(f"threshold must be a Threshold or None, got {type(threshold).__name__}")
    if consistency is not None and not isinstance(consistency, ConsistencyParam):
        raise ValueError(f"consistency must be an objectives.distill.ConsistencyParam or None, got "
                         f"{type(consistency).__name__}")
    post = dict(threshold=threshold, rederive_eps=rederive_eps, consistency=consistency)
    guided = guidance is not None and guidance.active
    if guided and (uncond_fn is None) == (pair_fn is None):
        raise ValueError("guidance.scale != 1 needs exactly one of uncond_fn(x, t) or pair_fn(x, t) -> (cond, uncond)")

    def net_inputs(x, t, alpha, sigma):
        if prediction == "edm":
            x, t = x / alpha, sigma / alpha
        return x, jnp.full((x.shape[0],), t, jnp.float32)

    def cond_only(x, t):
        return denoise_fn(x, t)

    def split(out, x):
        """[prediction, v] of a learned-variance output, C = x's channels each."""
        if out.shape[-1] != 2 * x.shape[-1]:
            raise ValueError(f"learned_variance needs the network's 2*{x.shape[-1]} output channels [prediction, v], "
                             f"got {out.shape[-1]}")
        return jnp.split(out, 2, axis=-1)

    def cond_and_uncond(x, t):
        cond, uncond = pair_fn(x, t) if pair_fn is not None else (denoise_fn(x, t), uncond_fn(x, t))
        if not learned_variance:
            return guide(cond, uncond, guidance.scale, guidance.rescale)
        (cond, v), (uncond, _) = split(cond, x), split(uncond, x)
        return jnp.concatenate([guide(cond, uncond, guidance.scale, guidance.rescale), v], axis=-1)

    def denoiser(x, t, alpha, sigma):
        xn, tn = net_inputs(x, t, alpha, sigma)
        if not guided:
            out = cond_only(xn, tn)
        elif guidance.interval is None:
            out = cond_and_uncond(xn, tn)
        else:
            lo, hi = guidance.interval
            s = sigma / alpha
            out = jax.lax.cond((s >= lo) & (s <= hi), cond_and_uncond, cond_only, xn, tn)
        if not learned_variance:
            return predict_x0_eps(out, x, alpha, sigma, prediction, clip_denoised, **post)
        out, v = split(out, x)
        return (*predict_x0_eps(out, x, alpha, sigma, prediction, clip_denoised, **post), v)

    return denoiser


def ode_derivative(denoiser: Denoiser):
    """The probability-flow ODE in EDM / VE coordinates y = x / alpha, s = sigma / alpha (Karras et al. 2022, eq. 3
    with sigma(t) = t, s(t) = 1):  dy/ds = (y - x0_hat) / s, the form Euler / Heun use.

    Returns derivative(y, t, alpha, sigma) -> (dy/ds, x0_hat) at a grid level (t, alpha, sigma) with s = sigma/alpha.
    Since y = x0 + s eps this equals eps_hat; computed as eps_hat, so it stays consistent with clipping.
    """
    def derivative(y, t, alpha, sigma):
        x0, eps = denoiser(alpha * y, t, alpha, sigma)
        return eps, x0
    return derivative
