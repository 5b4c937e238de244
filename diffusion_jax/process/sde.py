"""Continuous-time noise schedules: VP, sub-VP, VE (Song et al. 2021, "Score-Based Generative Modeling through
SDEs") and EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Every schedule gives the marginal of the forward process in the common form

    x_t = alpha(t) x_0 + sigma(t) eps,        eps ~ N(0, I),

and the linear forward SDE dx = f(t) x dt + g(t) dW it comes from, so that

    d log alpha / dt = f(t),        d sigma^2 / dt = 2 f(t) sigma^2 + g(t)^2.

log_snr(t) = log(alpha^2 / sigma^2) = 2 log(alpha / sigma) (the log signal-to-noise ratio; DPM-Solver's lambda is
half of it) and t_of_log_snr is its inverse, in closed form for all four. [t_min, t_max] is the time range a
sampler integrates over; `network_time(t)` is what the network was trained to receive as its time input.

All methods take t as a scalar or an array and compute with jnp (float32 unless x64 is enabled). The schedules
are frozen dataclasses of Python floats: hashable, so they can be closed over or passed as static arguments.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Protocol

import jax.numpy as jnp


class SDE(Protocol):
    """The interface shared by the schedules below (what grids and SDE solvers rely on); with `kind`, `discrete`,
    `network_level` and `truncate` it is the process protocol of `process/__init__.py`."""

    kind: str
    discrete: bool
    t_min: float
    t_max: float

    def alpha(self, t): ...
    def sigma(self, t): ...
    def log_snr(self, t): ...
    def t_of_log_snr(self, log_snr): ...
    def f(self, t): ...
    def g2(self, t): ...
    def network_time(self, t): ...
    def network_level(self, t): ...
    def truncate(self, strength: float): ...


def _truncated_time(schedule, strength: float):
    """The process restricted to [t_min, t_min + strength (t_max - t_min)] (SDEdit's [0, t_0])."""
    return dataclasses.replace(schedule, t_max=schedule.t_min + strength * (schedule.t_max - schedule.t_min))


def _t(t):
    return jnp.asarray(t, jnp.result_type(float))


def _scaled_time_level(schedule, t):
    """(alpha, sigma) float32 at network time t = time_scale x SDE time (VP, sub-VP)."""
    tc = _t(t).astype(jnp.float32) / schedule.time_scale
    return schedule.alpha(tc).astype(jnp.float32), schedule.sigma(tc).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class VPSDE:
    """Variance-preserving SDE (Song et al. 2021, eq. 11), the continuous limit of DDPM's linear betas:

        beta(t) = beta_min + t (beta_max - beta_min),   B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2/2,
        dx = -beta(t)/2 x dt + sqrt(beta(t)) dW,         alpha = exp(-B/2),   sigma = sqrt(1 - exp(-B)).

    beta_min = T beta_1, beta_max = T beta_T for DDPM's betas (T = 1000: 0.1, 20). t_min = 1e-3 is score_sde's
    sampling eps for VP. Network time: score_sde's DDPM-style networks get t * 999 (`time_scale`, their
    `labels = t * (N - 1)`), i.e. the DDPM timestep index, possibly fractional; set time_scale = 1 for networks
    trained on t in [0, 1].
    """

    kind: ClassVar[str] = "vp"
    discrete: ClassVar[bool] = False
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    time_scale: float = 999.0

    def beta(self, t):
        return self.beta_min + _t(t) * (self.beta_max - self.beta_min)

    def int_beta(self, t):
        """B(t) = int_0^t beta(s) ds."""
        t = _t(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

    def t_of_int_beta(self, b):
        """Inverse of B: the positive root of (beta_max - beta_min)/2 t^2 + beta_min t - b = 0, written without
        cancellation (as DPM-Solver's NoiseScheduleVP.inverse_lambda)."""
        return 2.0 * b / (jnp.sqrt(self.beta_min ** 2 + 2.0 * (self.beta_max - self.beta_min) * b) + self.beta_min)

    def alpha(self, t):
        return jnp.exp(-0.5 * self.int_beta(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(-self.int_beta(t)))

    def log_snr(self, t):
        return -jnp.log(jnp.expm1(self.int_beta(t)))                  # log(e^-B / (1 - e^-B))

    def t_of_log_snr(self, log_snr):
        return self.t_of_int_beta(jnp.logaddexp(0.0, -_t(log_snr)))   # B = log(1 + e^-log_snr)

    def f(self, t):
        return -0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t)

    def network_time(self, t):
        return self.time_scale * _t(t)

    def network_level(self, t):
        return _scaled_time_level(self, t)

    def truncate(self, strength: float):
        return _truncated_time(self, strength)


@dataclasses.dataclass(frozen=True)
class SubVPSDE:
    """Sub-VP SDE (Song et al. 2021, eq. 29; marginal in their appendix eq. 34), same beta(t), B(t) as VPSDE:

        dx = -beta(t)/2 x dt + sqrt(beta(t) (1 - exp(-2 B(t)))) dW,
        alpha = exp(-B/2),   sigma = 1 - exp(-B)    (the std; its variance (1 - e^-B)^2 is below VP's 1 - e^-B).

    Network time as VPSDE: t * 999 for score_sde's networks.
    """

    kind: ClassVar[str] = "subvp"
    discrete: ClassVar[bool] = False
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    time_scale: float = 999.0

    def _vp(self):
        return VPSDE(self.beta_min, self.beta_max)

    def alpha(self, t):
        return jnp.exp(-0.5 * self._vp().int_beta(t))

    def sigma(self, t):
        return -jnp.expm1(-self._vp().int_beta(t))

    def log_snr(self, t):
        b = self._vp().int_beta(t)
        return -b - 2.0 * jnp.log(-jnp.expm1(-b))

    def t_of_log_snr(self, log_snr):
        # u = e^-B solves SNR (1 - u)^2 = u; the root in (0, 1) is u = 2 SNR / (2 SNR + 1 + sqrt(4 SNR + 1)), so
        # B = log1p((1 + sqrt(4 SNR + 1)) / (2 SNR)); in terms of r = 1/SNR: log1p((r + sqrt(4 r + r^2)) / 2).
        r = jnp.exp(-_t(log_snr))
        return self._vp().t_of_int_beta(jnp.log1p(0.5 * (r + jnp.sqrt(r * (4.0 + r)))))

    def f(self, t):
        return -0.5 * self._vp().beta(t)

    def g2(self, t):
        vp = self._vp()
        return vp.beta(t) * -jnp.expm1(-2.0 * vp.int_beta(t))

    def network_time(self, t):
        return self.time_scale * _t(t)

    def network_level(self, t):
        return _scaled_time_level(self, t)

    def truncate(self, strength: float):
        return _truncated_time(self, strength)


@dataclasses.dataclass(frozen=True)
class VESDE:
    """Variance-exploding SDE (Song et al. 2021, eq. 9; SMLD / NCSN):

        sigma(t) = sigma_min (sigma_max / sigma_min)^t,   alpha = 1,
        dx = sqrt(d sigma^2/dt) dW,   g^2 = 2 sigma(t)^2 log(sigma_max / sigma_min),   f = 0.

    As in score_sde the marginal is taken as x_0 + sigma(t) eps (the SDE started at t = 0 gives variance
    sigma(t)^2 - sigma_min^2; the difference is negligible). Defaults are score_sde's CIFAR-10 ones; t_min = 1e-5
    is its VE sampling eps. Network time: score_sde's NCSN networks are conditioned on the noise level itself,
    so network_time(t) = sigma(t) (they take its log internally).
    """

    kind: ClassVar[str] = "ve"
    discrete: ClassVar[bool] = False
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0

    def alpha(self, t):
        return jnp.ones_like(_t(t))

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _t(t)

    def log_snr(self, t):
        return -2.0 * jnp.log(self.sigma(t))

    def t_of_log_snr(self, log_snr):
        return (-0.5 * _t(log_snr) - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)

    def f(self, t):
        return jnp.zeros_like(_t(t))

    def g2(self, t):
        return 2.0 * self.sigma(t) ** 2 * math.log(self.sigma_max / self.sigma_min)

    def network_time(self, t):
        return self.sigma(t)

    def network_level(self, t):   # network time is sigma (alpha = 1)
        t = _t(t).astype(jnp.float32)
        return jnp.ones(t.shape, jnp.float32), t

    def truncate(self, strength: float):
        return _truncated_time(self, strength)


@dataclasses.dataclass(frozen=True)
class EDMSchedule:
    """EDM (Karras et al. 2022, Table 1): time is the noise level, sigma(t) = t, alpha = 1, so x = x_0 + t eps and
    dx = sqrt(2 t) dW (f = 0, g^2 = d sigma^2/dt = 2 t). [t_min, t_max] = [sigma_min, sigma_max].

    Network time is sigma itself: EDM's preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
    (`edm.edm_denoise`, applied by `sampling.network_denoise_fn` for this schedule) maps it to c_noise =
    log(sigma)/4; samplers get D, prediction "edm". sigma_data is the data std the preconditioning uses.
    """

    kind: ClassVar[str] = "edm"
    discrete: ClassVar[bool] = False
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def alpha(self, t):
        return jnp.ones_like(_t(t))

    def sigma(self, t):
        return _t(t)

    def log_snr(self, t):
        return -2.0 * jnp.log(_t(t))

    def t_of_log_snr(self, log_snr):
        return jnp.exp(-0.5 * _t(log_snr))

    def f(self, t):
        return jnp.zeros_like(_t(t))

    def g2(self, t):
        return 2.0 * _t(t)

    def network_time(self, t):
        return _t(t)

    def network_level(self, t):   # network time is sigma (alpha = 1)
        t = _t(t).astype(jnp.float32)
        return jnp.ones(t.shape, jnp.float32), t

    def truncate(self, strength: float):   # time = sigma: interpolate log sigma, as VE's time does
        return dataclasses.replace(self, sigma_max=self.t_min * (self.t_max / self.t_min) ** strength)


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "edm": EDMSchedule}
