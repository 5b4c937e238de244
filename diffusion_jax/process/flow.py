"""Flow matching's linear interpolant (rectified flow), with the timestep shift of Stable Diffusion 3 and Flux.

Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu, Gong & Liu 2023, "Flow Straight and Fast"
(rectified flow); Esser et al. 2024, "Scaling Rectified Flow Transformers" (SD3, sec. 3 and 5.3.2: the shift):

    x_sigma = (1 - sigma) x_0 + sigma eps,     alpha = 1 - sigma,     v = dx_sigma / dsigma = eps - x_0,

the straight path from the data (sigma = 0) to the noise (sigma = 1); the network predicts the velocity v
(`param` prediction "flow"). A process of the protocol (`process/__init__.py`) with time t in [t_min, t_max] and

    sigma(t) = shift t / (1 + (shift - 1) t)            (SD3's timestep shift; shift = 1: sigma = t)

so that uniform steps in t are diffusers' FlowMatch grids with `shift` and that training on t ~ U(0, 1) draws SD3's
shifted times. log_snr = 2 log((1 - sigma) / sigma), with the inverse sigma = 1 / (1 + exp(log_snr / 2)). The network
gets time_scale sigma (SD3 / Flux: timestep = 1000 sigma). The forward SDE of these marginals, for the solvers that
need one: f = d log alpha / dt = -sigma' / (1 - sigma), g^2 = d sigma^2 / dt - 2 f sigma^2
= 2 sigma sigma' / (1 - sigma), with sigma' = d sigma / dt = shift / (1 + (shift - 1) t)^2.

At t = 1 the marginal is pure noise (alpha = 0). Grids built from the process (`grid.continuous_grid`) and the
likelihood ODE start where alpha^2 = 2^-24 instead (`grid.start_time`, the stand-in diffusers uses for a zero terminal
SNR), where x / alpha and the log-SNR are finite for every sampler; diffusers' FlowMatch grids
(`samplers/diffusers_flow.py`) start at sigma = 1 exactly, where the flow solvers and DDIM never divide by alpha.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from diffusion_jax.process.sde import _t, _truncated_time


@dataclasses.dataclass(frozen=True)
class RectifiedFlow:
    """The linear interpolant x = (1 - sigma) x_0 + sigma eps with sigma(t) the shifted time (module doc)."""

    kind: ClassVar[str] = "flow"
    discrete: ClassVar[bool] = False
    shift: float = 1.0
    t_min: float = 1e-3          # diffusers' FlowMatch grids end at sigma = 1 / num_train_timesteps (before shifting)
    t_max: float = 1.0
    time_scale: float = 1000.0

    def __post_init__(self):
        if not (isinstance(self.shift, (int, float)) and 0 < self.shift < float("inf")):
            raise ValueError(f"schedule.shift={self.shift!r} must be a positive number")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"the flow's times need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")

    def sigma(self, t):
        t = _t(t)
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def alpha(self, t):
        return 1.0 - self.sigma(t)

    def log_snr(self, t):
        sigma = self.sigma(t)
        return 2.0 * (jnp.log1p(-sigma) - jnp.log(sigma))

    def t_of_log_snr(self, log_snr):
        sigma = 1.0 / (1.0 + jnp.exp(0.5 * _t(log_snr)))
        return sigma / (self.shift - (self.shift - 1.0) * sigma)          # the inverse of the shift

    def dsigma_dt(self, t):
        return self.shift / (1.0 + (self.shift - 1.0) * _t(t)) ** 2

    def f(self, t):
        return -self.dsigma_dt(t) / self.alpha(t)

    def g2(self, t):
        return 2.0 * self.sigma(t) * self.dsigma_dt(t) / self.alpha(t)

    def network_time(self, t):
        return self.time_scale * self.sigma(t)

    def network_level(self, t):
        """(alpha, sigma) float32 of network time t = time_scale sigma."""
        sigma = _t(t).astype(jnp.float32) / self.time_scale
        return (1.0 - sigma).astype(jnp.float32), sigma.astype(jnp.float32)

    def truncate(self, strength: float):
        return _truncated_time(self, strength)


FLOWS = {"flow": RectifiedFlow}
