"""Noise schedules and the forward process q(x_t | x_0).

Discrete schedules (Ho et al. 2020) are defined by betas beta_1..beta_T; with alpha_t = 1 - beta_t and
alpha_bar_t = prod_{s<=t} alpha_s the forward process is

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

We index timesteps 0..T-1 as the code of Ho et al. and diffusers do (index t holds beta_{t+1}).
Signal-to-noise ratio SNR_t = alpha_bar_t / (1 - alpha_bar_t); we write alpha_t := sqrt(alpha_bar_t)
for the signal scale and sigma_t := sqrt(1 - alpha_bar_t) for the noise scale where a formula needs them
(Kingma et al. 2021 notation).

A continuous-time view (t in [0, 1]) of the same schedules lives in `ContinuousSchedule`.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "sigmoid": (1e-4, 0.02)}  # (start, end)


# ----------------------------------------------------------------------------------------------------
# Beta schedules (float64 numpy: computed once, on the host, like the reference implementations).
# ----------------------------------------------------------------------------------------------------
def _cosine_alpha_bar(t, s: float = 0.008):
    """Improved DDPM (Nichol & Dhariwal 2021, eq. 17) alpha_bar(t) = f(t)/f(0), f(t)=cos^2((t+s)/(1+s) pi/2)."""
    return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def beta_schedule(name: str, num_timesteps: int, beta_start: float | None = None,
                  beta_end: float | None = None, max_beta: float = 0.999) -> np.ndarray:
    """Betas (T,) float64 for a named schedule.

    linear         Ho et al. 2020: linspace(1e-4, 0.02, T).
    scaled_linear  Stable Diffusion (Rombach et al. 2022): linspace(sqrt(0.00085), sqrt(0.012), T)**2.
    cosine         Nichol & Dhariwal 2021: beta_t = min(1 - abar(t+1/T)/abar(t/T), 0.999).
    sigmoid        GeoDiff (Xu et al. 2022): sigmoid(linspace(-6, 6, T)) * (end - start) + start.
    """
    start, end = check_schedule(name, num_timesteps, beta_start, beta_end)
    T = int(num_timesteps)
    if name == "linear":
        betas = np.linspace(start, end, T, dtype=np.float64)
    elif name == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float64) ** 2
    elif name == "cosine":
        i = np.arange(T, dtype=np.float64)
        betas = np.minimum(1 - _cosine_alpha_bar((i + 1) / T) / _cosine_alpha_bar(i / T), max_beta)
    else:  # sigmoid
        x = np.linspace(-6, 6, T, dtype=np.float64)
        betas = 1 / (1 + np.exp(-x)) * (end - start) + start
    return betas


def check_schedule(name: str, num_timesteps: int, beta_start: float | None = None,
                   beta_end: float | None = None) -> tuple[float | None, float | None]:
    """ValueError naming `schedule.<key>` unless: name in BETA_SCHEDULES, num_timesteps a positive int, and
    beta_start <= beta_end both in (0, 1) (each None -> the schedule's default; cosine ignores them).
    Returns the (beta_start, beta_end) the schedule uses (for cosine: as given)."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"schedule.name={name!r} is unknown; choose from {BETA_SCHEDULES}")
    if not isinstance(num_timesteps, (int, np.integer)) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"schedule.num_timesteps must be a positive int, got {num_timesteps!r}")
    for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and 0 < value < 1
        if value is not None and not ok:
            raise ValueError(f"schedule.{key} must be None or a number in (0, 1), got {value!r}")
    if name == "cosine":
        return beta_start, beta_end
    start = DEFAULT_BETAS[name][0] if beta_start is None else float(beta_start)
    end = DEFAULT_BETAS[name][1] if beta_end is None else float(beta_end)
    if start > end:
        raise ValueError(f"schedule.beta_start={start:g} must be <= schedule.beta_end={end:g} "
                         f"(a None one is {name!r}'s default)")
    return start, end


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed", Alg. 1).

    Shift and scale sqrt(alpha_bar) so that sqrt(alpha_bar_T) = 0 (SNR_T = 0) while sqrt(alpha_bar_1) is kept.
    """
    abar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


# ----------------------------------------------------------------------------------------------------
# The discrete schedule as a pytree of float32 tables (passes through jit; T is static via the shape).
# ----------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class DiscreteSchedule:
    """Tables of length T for a discrete-time diffusion (all float32, index t = 0..T-1). The process protocol
    (`process/__init__.py`): kind "discrete", time = the timestep index, network time = the same index."""

    kind: ClassVar[str] = "discrete"
    discrete: ClassVar[bool] = True

    betas: jax.Array
    alphas_cumprod: jax.Array        # alpha_bar_t
    alphas_cumprod_prev: jax.Array   # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    sqrt_alphas_cumprod: jax.Array   # alpha_t = sqrt(alpha_bar_t)   (float64 on the host, then float32:
    sqrt_one_minus_alphas_cumprod: jax.Array  # sigma_t = sqrt(1 - alpha_bar_t)   1 - abar is exact at small t)
    # posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)   (Ho et al. eq. 6-7)
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @classmethod
    def from_betas(cls, betas) -> "DiscreteSchedule":
        b = np.asarray(betas, np.float64)
        if b.ndim != 1 or not np.all((b > 0) & (b <= 1)):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        abar = np.cumprod(1.0 - b)
        with np.errstate(divide="ignore"):  # beta = 1 (zero terminal SNR) gives log 0 = -inf: fine here
            one_minus_abar = -np.expm1(np.cumsum(np.log1p(-b)))
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at t=0; clip the log as Ho et al. do (use the t=1 value there).
        post_logvar = np.log(np.concatenate([post_var[1:2], post_var[1:]])) if len(b) > 1 else np.log(b)
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return cls(
            betas=f32(b), alphas_cumprod=f32(abar), alphas_cumprod_prev=f32(abar_prev),
            sqrt_alphas_cumprod=f32(np.sqrt(abar)), sqrt_one_minus_alphas_cumprod=f32(np.sqrt(one_minus_abar)),
            posterior_variance=f32(post_var), posterior_log_variance_clipped=f32(post_logvar),
            posterior_mean_coef1=f32(b * np.sqrt(abar_prev) / (1.0 - abar)),
            posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar)),
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def alpha(self, t):
        """Signal scale sqrt(alpha_bar_t), shape of t."""
        return self.sqrt_alphas_cumprod[t]

    def sigma(self, t):
        """Noise scale sqrt(1 - alpha_bar_t), shape of t."""
        return self.sqrt_one_minus_alphas_cumprod[t]

    def snr(self, t):
        """alpha_bar_t / (1 - alpha_bar_t)."""
        return (self.sqrt_alphas_cumprod[t] / self.sqrt_one_minus_alphas_cumprod[t]) ** 2

    def log_snr(self, t):
        return 2.0 * (jnp.log(self.sqrt_alphas_cumprod[t]) - jnp.log(self.sqrt_one_minus_alphas_cumprod[t]))

    @property
    def t_min(self) -> int:
        return 0

    @property
    def t_max(self) -> int:
        return self.num_timesteps - 1

    def interpolated_level(self, t):
        """(alpha_t, sigma_t) at timesteps t (B,). Integer t: the tables. Fractional t (as diffusers' Karras-sigma
        schedulers feed): log-SNR interpolated linearly between the neighbouring integer timesteps,
        alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda)) (a VP schedule)."""
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.integer):
            return self.alpha(t), self.sigma(t)
        T = self.num_timesteps
        t = jnp.clip(t.astype(jnp.float32), 0.0, T - 1)
        lo = jnp.floor(t).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, T - 1)
        f = t - lo
        l_lo, l_hi = self.log_snr(lo), self.log_snr(hi)
        lam = jnp.where(f == 0, l_lo, jnp.where(f == 1, l_hi, (1 - f) * l_lo + f * l_hi))   # -inf safe (ZTSNR)
        return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

    def network_level(self, t):
        """(alpha, sigma) float32 of the level the network means by time input t: `interpolated_level`, exact to
        the last bit on integral t."""
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.integer):
            return self.alpha(t), self.sigma(t)
        alpha, sigma = self.interpolated_level(t)
        ti = jnp.clip(jnp.round(t), 0, self.num_timesteps - 1).astype(jnp.int32)
        on_table = t == ti
        return jnp.where(on_table, self.alpha(ti), alpha), jnp.where(on_table, self.sigma(ti), sigma)

    def truncate(self, strength: float) -> "DiscreteSchedule":
        """The first max(1, round(strength T)) timesteps (SDEdit's restriction to [0, t_0])."""
        t0 = max(1, round(strength * self.num_timesteps))
        with jax.ensure_compile_time_eval():     # a schedule closed over by a jitted caller stays concrete
            return jax.tree.map(lambda a: a[:t0], self)


def make_schedule(name: str = "linear", num_timesteps: int = 1000, *, beta_start: float | None = None,
                  beta_end: float | None = None, zero_terminal_snr: bool = False) -> DiscreteSchedule:
    """The one entry point from a config: `make_schedule(**config.schedule)`."""
    betas = beta_schedule(name, num_timesteps, beta_start, beta_end)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return DiscreteSchedule.from_betas(betas)


def _bcast(v, x):
    """Per-example scalars (B,) -> (B, 1, 1, ...) to broadcast against x."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(schedule: DiscreteSchedule, x0, t, noise):
    """Sample x_t ~ q(x_t | x_0) in closed form: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    x0, noise: (B, ...); t: (B,) int timesteps. Returns x_t with the shape of x0.
    """
    return _bcast(schedule.alpha(t), x0) * x0 + _bcast(schedule.sigma(t), x0) * noise


def q_posterior(schedule: DiscreteSchedule, x0, xt, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7)."""
    mean = _bcast(schedule.posterior_mean_coef1[t], xt) * x0 + _bcast(schedule.posterior_mean_coef2[t], xt) * xt
    return mean, _bcast(schedule.posterior_variance[t], xt), _bcast(schedule.posterior_log_variance_clipped[t], xt)


# ----------------------------------------------------------------------------------------------------
# Continuous-time view, t in [0, 1]
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ContinuousSchedule:
    """alpha_bar(t) for t in [0, 1] of a VP diffusion, with x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps.

    kind="linear":  the continuous limit of the linear betas (Song et al. 2021 VP-SDE),
                    beta(t) = beta_min + t (beta_max - beta_min), beta_min = T beta_start, beta_max = T beta_end,
                    log abar(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2).
    kind="cosine":  abar(t) = f(t) / f(0) exactly as in improved DDPM (t = i / T on the grid).
    kind="table":   any discrete schedule: log abar is interpolated linearly between the grid points
                    t_i = (i + 1) / T (i = 0..T-1) and log abar(0) = 0; exact on the grid.
    """

    kind: str
    beta_min: float = 0.1
    beta_max: float = 20.0
    cosine_s: float = 0.008
    log_abar_table: tuple[float, ...] = ()

    @classmethod
    def from_config(cls, name: str = "linear", num_timesteps: int = 1000, *, beta_start=None, beta_end=None,
                    zero_terminal_snr: bool = False) -> "ContinuousSchedule":
        betas = check_schedule(name, num_timesteps, beta_start, beta_end)
        if name == "linear" and not zero_terminal_snr:
            return cls("linear", beta_min=num_timesteps * betas[0], beta_max=num_timesteps * betas[1])
        if name == "cosine" and not zero_terminal_snr:
            return cls("cosine")
        betas = beta_schedule(name, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        log_abar = np.cumsum(np.log1p(-np.minimum(betas, 1 - 1e-12)))
        return cls("table", log_abar_table=tuple(float(v) for v in log_abar))

    def log_alpha_bar(self, t):
        t = jnp.asarray(t, jnp.float32)
        if self.kind == "linear":
            return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2)
        if self.kind == "cosine":
            f = lambda u: jnp.cos((u + self.cosine_s) / (1 + self.cosine_s) * jnp.pi / 2) ** 2
            return jnp.log(jnp.maximum(f(t), 1e-20)) - jnp.log(f(0.0))
        if self.kind == "table":
            T = len(self.log_abar_table)
            grid = jnp.linspace(0.0, 1.0, T + 1)
            return jnp.interp(t, grid, jnp.asarray((0.0,) + self.log_abar_table, jnp.float32))
        raise ValueError(f"unknown ContinuousSchedule kind {self.kind!r}")

    def alpha_bar(self, t):
        return jnp.exp(self.log_alpha_bar(t))

    def alpha(self, t):
        return jnp.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(self.log_alpha_bar(t)))

    def log_snr(self, t):
        la = self.log_alpha_bar(t)
        return la - jnp.log(-jnp.expm1(la))

    def snr(self, t):
        return jnp.exp(self.log_snr(t))
