"""The time discretization a solver runs on: a `Grid` of K + 1 noise levels, and the spacings that build one.

A solver `solver(denoiser, grid, x_T, key, **options) -> (x, info)` takes K steps, level i -> i + 1, with
`lax.scan` over the grid's arrays; it never needs the schedule. Levels are in VP coordinates
x = alpha_i x0 + sigma_i eps (VE / EDM: alpha = 1); EDM-style solvers work in y = x / alpha, s = sigma / alpha
(`Grid.sigma_ve`), DPM-Solver-style ones in lambda = log(alpha / sigma) (`Grid.lam`).

Spacings (n = K network levels with final="zero", K + 1 with final="last"):

    leading / trailing / linspace   DDIM / diffusers timestep selection (`spacing.select_timesteps`), discrete only
    uniform     uniform in t from t_max to t_min (discrete: = linspace)
    quadratic   discrete: DDIM's code (Song et al. 2021, skip_type "quad"), t_i = int(0.8 T (i / (n - 1))^2),
                `[int(s) for s in np.linspace(0, np.sqrt(0.8 T), n) ** 2]` reversed (repeats raise a ValueError);
                continuous: DPM-Solver's "time_quadratic", t = (linspace(sqrt(t_max), sqrt(t_min), n))^2
    karras      EDM eq. 5 in s = sigma / alpha:  s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho;
                discrete: s_min, s_max of timesteps 0 and T - 1 and t the fractional timestep with that s by linear
                interpolation of log s (diffusers' EulerDiscreteScheduler(use_karras_sigmas=True))
    logsnr      uniform in lambda between the ends (DPM-Solver's "logSNR" skip type; diffusers' use_lu_lambdas)

final="zero" appends the clean end (sigma = 0, alpha = 1), as diffusers' final_sigmas_type="zero" and DDIM's
set_alpha_to_one; final="last" stops at the smallest noise level (as DPM-Solver's t_0 = eps), no jump to 0.
Grids are built on the host (numpy, float64) from a concrete schedule and passed into jit as an argument.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.spacing import select_timesteps

SPACINGS = ("leading", "trailing", "linspace", "uniform", "quadratic", "karras", "logsnr")
FINALS = ("zero", "last")
DISCRETE_ONLY_SPACINGS = ("leading", "linspace")
MIN_ALPHA_BAR = 2.0 ** -24   # stands in for alpha_bar = 0 (zero terminal SNR) where log s is needed, as diffusers


@flax.struct.dataclass
class Grid:
    """K+1 noise levels, noisiest first, in VP coordinates x = alpha_i x0 + sigma_i eps (VE/EDM: alpha = 1).

    t:     (K+1,) float32 network time input at each level (discrete schedules: DDPM timestep index, possibly
           fractional; continuous: the schedule's network_time; EDM: sigma). At a clean end (sigma = 0) it is a
           placeholder never given to a network: -1 for discrete schedules (DDIM's prev_timestep), else 0.
    alpha: (K+1,) float32
    sigma: (K+1,) float32      the last level is the clean end (sigma = 0, alpha = 1) unless a sampler says otherwise
    """

    t: jax.Array
    alpha: jax.Array
    sigma: jax.Array

    @property
    def num_steps(self) -> int:
        """K (static: from the shape)."""
        return int(self.t.shape[0]) - 1

    @property
    def lam(self):
        """lambda_i = log(alpha_i / sigma_i) (DPM-Solver's lambda, half the log-SNR); +inf at sigma = 0."""
        return jnp.log(self.alpha) - jnp.log(self.sigma)

    @property
    def log_snr(self):
        """log(alpha_i^2 / sigma_i^2) = 2 lambda_i, as `schedules` and `sde` define log_snr; +inf at sigma = 0."""
        return 2.0 * self.lam

    @property
    def sigma_ve(self):
        """s_i = sigma_i / alpha_i, the noise level in VE / EDM coordinates y = x / alpha = x0 + s eps."""
        return self.sigma / self.alpha


def transitions(grid):
    """Per step i -> i + 1 of a Gaussian process on the grid's levels, each (K,):
    alpha_{i|i+1} = alpha_i / alpha_{i+1}, beta_i = Var q(x_i | x_{i+1}) = sigma_i^2 - alpha_{i|i+1}^2 sigma_{i+1}^2
    (clamped at 0 against rounding) and the posterior variance Var q(x_{i+1} | x_i, x0) = sigma_{i+1}^2 / sigma_i^2
    beta_i. On integer DDPM timesteps these are the respaced beta'_t and beta~'_t (Nichol & Dhariwal sec. 4)."""
    a, s = grid.alpha, grid.sigma
    a_ratio = a[:-1] / a[1:]
    beta = jnp.maximum(s[:-1] ** 2 - (a_ratio * s[1:]) ** 2, 0.0)
    return a_ratio, beta, s[1:] ** 2 / s[:-1] ** 2 * beta


def concrete_or_none(a):
    """The numpy value of `a`, or None when it is a tracer (a grid passed into jit as an argument)."""
    try:
        return np.asarray(jax.device_get(a))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_levels(grid, x_T, min_levels: int, sde=None, sde_methods: tuple[str, ...] = ()) -> None:
    """The argument checks every solver shares: a Grid with >= min_levels levels, x_T an array (B, ...), and
    `sde` None or a `diffusion_jax.process.sde` schedule with `sde_methods`."""
    if sde is not None and not all(hasattr(sde, m) for m in sde_methods):
        raise ValueError(f"sampler.sde must be None or a schedule of diffusion_jax.process.sde, got {type(sde).__name__}")
    if not hasattr(grid, "sigma") or grid.t.ndim != 1 or grid.t.shape[0] < min_levels:
        steps = " (one step)" if min_levels == 2 else ""
        raise ValueError(f"grid must be a Grid with at least {min_levels} level{'s' if min_levels > 1 else ''}{steps}")
    if not hasattr(x_T, "shape") or len(x_T.shape) < 1:
        raise ValueError(f"x_T must be an array (B, ...), got {type(x_T).__name__}")


def _grid(t, alpha, sigma, final: str, t_clean: float) -> Grid:
    t, alpha, sigma = (np.asarray(a, np.float64) for a in (t, alpha, sigma))
    if final == "zero":
        t, alpha, sigma = np.append(t, t_clean), np.append(alpha, 1.0), np.append(sigma, 0.0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Grid(t=f32(t), alpha=f32(alpha), sigma=f32(sigma))


def _check(steps, spacing: str, rho: float, final: str, discrete: bool) -> int:
    """Validates the options; returns n, the number of levels the network is evaluated at."""
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sampler.steps must be a positive int, got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"sampler.spacing={spacing!r} is unknown; choose from {SPACINGS}")
    if not discrete and spacing in DISCRETE_ONLY_SPACINGS:
        raise ValueError(f"sampler.spacing={spacing!r} selects timesteps of a discrete schedule; for a continuous "
                         f"one choose from {tuple(s for s in SPACINGS if s not in DISCRETE_ONLY_SPACINGS)}")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"sampler.rho must be a finite number > 0, got {rho!r}")
    if final not in FINALS:
        raise ValueError(f"sampler.final={final!r} is unknown; choose from {FINALS}")
    return int(steps) + (final == "last")


def _karras(s_max: float, s_min: float, n: int, rho: float) -> np.ndarray:
    """EDM eq. 5 (with i / (n - 1); one level gives s_max)."""
    ramp = np.linspace(0.0, 1.0, n)
    return (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


def discrete_grid(schedule, steps: int, spacing: str = "leading", *, rho: float = 7.0,
                  final: str = "zero") -> Grid:
    """Grid of `steps` steps on a `DiscreteSchedule` (t = DDPM timestep index, alpha = sqrt(alpha_bar_t)).

    Integer timesteps (leading, trailing, linspace, uniform, quadratic) take alpha, sigma from the schedule's
    tables (as `respace` does, to the last float32 bit of sigma). karras and logsnr give fractional t and
    alpha = 1 / sqrt(1 + s^2), sigma = s alpha for their s; with zero terminal SNR they use alpha_bar_{T-1} = 2^-24.
    """
    n = _check(steps, spacing, rho, final, discrete=True)
    T = schedule.num_timesteps
    if spacing in ("leading", "trailing", "linspace", "uniform", "quadratic") and n > T:
        raise ValueError(f"sampler.steps={steps} needs {n} distinct timesteps with final={final!r}, more than "
                         f"the schedule's {T}")
    alpha_tab = np.asarray(schedule.sqrt_alphas_cumprod, np.float64)
    sigma_tab = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)
    if spacing in ("karras", "logsnr"):
        abar = np.maximum(alpha_tab ** 2, MIN_ALPHA_BAR)
        log_s = 0.5 * (np.log(sigma_tab ** 2) - np.log(abar))            # log sigma_ve, increasing in t
        if spacing == "karras":
            s = _karras(math.exp(log_s[-1]), math.exp(log_s[0]), n, rho)
        else:  # uniform in lambda = -log s
            s = np.exp(np.linspace(log_s[-1], log_s[0], n))
        t = np.interp(np.log(s), log_s, np.arange(T, dtype=np.float64))  # diffusers' _sigma_to_t
        alpha = 1.0 / np.sqrt(1.0 + s ** 2)
        return _grid(t, alpha, s * alpha, final, -1.0)
    if spacing == "quadratic":
        ts = np.array([int(v) for v in np.linspace(0, np.sqrt(T * 0.8), n) ** 2])[::-1]   # DDIM's "quad"
        if np.any(np.diff(ts) >= 0):
            raise ValueError(f"sampler.steps={steps}: spacing='quadratic' (DDIM's int((i sqrt(0.8 T)/(n-1))^2)) "
                             f"repeats timesteps for T={T}; use fewer steps or another sampler.spacing")
    else:
        ts = select_timesteps(T, n, "linspace" if spacing == "uniform" else spacing)
    return _grid(ts, alpha_tab[ts], sigma_tab[ts], final, -1.0)


def levels_of_s(process, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(network time, alpha, sigma), numpy float64, of the levels with s = sigma / alpha (> 0) on `process`: on a
    discrete schedule t is the fractional timestep with that s (t linear in log s between the table's timesteps,
    diffusers' _sigma_to_t) and alpha = 1 / sqrt(1 + s^2); on a continuous one the schedule's own time and scales."""
    s = np.asarray(s, np.float64)
    if process.discrete:
        abar = np.maximum(np.asarray(process.sqrt_alphas_cumprod, np.float64) ** 2, MIN_ALPHA_BAR)
        log_s = 0.5 * (np.log(np.asarray(process.sqrt_one_minus_alphas_cumprod, np.float64) ** 2) - np.log(abar))
        a = 1.0 / np.sqrt(1.0 + s ** 2)
        return np.interp(np.log(s), log_s, np.arange(len(log_s), dtype=np.float64)), a, s * a
    tau = process.t_of_log_snr(jnp.asarray(-2.0 * np.log(s), jnp.float32))
    return tuple(np.asarray(fn(tau), np.float64) for fn in (process.network_time, process.alpha, process.sigma))


def start_time(sde) -> float:
    """sde.t_max, or, for a process that is pure noise there (alpha = 0: the flow's sigma = 1), the time where
    alpha^2 = MIN_ALPHA_BAR: where x / alpha and the log-SNR are finite (the grids and the likelihood ODE start)."""
    t_max = float(sde.t_max)
    with jax.ensure_compile_time_eval():      # a Python float, also when called under a jit trace
        if float(sde.alpha(t_max)) ** 2 < MIN_ALPHA_BAR:
            t_max = float(sde.t_of_log_snr(math.log(MIN_ALPHA_BAR / (1.0 - MIN_ALPHA_BAR))))
    return t_max


def continuous_grid(sde, steps: int, spacing: str = "uniform", *, rho: float = 7.0, final: str = "zero") -> Grid:
    """Grid of `steps` steps between sde.t_max and sde.t_min for a schedule of `diffusion_jax.process.sde`.

    t on the grid is sde.network_time; alpha, sigma are the schedule's at the chosen times (karras and logsnr
    choose s = sigma/alpha or lambda and map back with sde.t_of_log_snr). "uniform", "quadratic", "karras" and
    "logsnr" place the n levels from t_max to t_min, so the last network evaluation is at t_min (on a flow sigma =
    1e-3: a step that changes almost nothing); "trailing" places them at t_max (n - i) / n, every step of the same
    length down to the clean end, as diffusers' trailing timesteps and FlowMatch sigmas do. A process that is pure
    noise at t_max (alpha = 0: the flow's sigma = 1) starts at alpha^2 = MIN_ALPHA_BAR instead, where s and lambda are
    finite.
    """
    n = _check(steps, spacing, rho, final, discrete=False)
    t_max, t_min = float(sde.t_max), float(sde.t_min)
    if not 0 <= t_min < t_max:
        raise ValueError(f"sde.t_min < sde.t_max is needed, got t_min={t_min}, t_max={t_max}")
    t_max = start_time(sde)
    if spacing == "uniform":
        t = np.linspace(t_max, t_min, n)
    elif spacing == "trailing":   # evenly spaced from t_max, the last level one step above the clean end (diffusers'
        t = np.maximum(t_max * (1.0 - np.arange(n) / n), t_min)   # "trailing" timesteps; FlowMatch's sigmas)
    elif spacing == "quadratic":
        t = np.linspace(math.sqrt(t_max), math.sqrt(t_min), n) ** 2
    else:
        ls_max, ls_min = (float(sde.log_snr(v)) for v in (t_min, t_max))
        if spacing == "karras":   # s = sigma/alpha = exp(-log_snr / 2)
            log_snr = -2.0 * np.log(_karras(math.exp(-0.5 * ls_min), math.exp(-0.5 * ls_max), n, rho))
        else:
            log_snr = np.linspace(ls_min, ls_max, n)
        t = np.asarray(sde.t_of_log_snr(jnp.asarray(log_snr, jnp.float32)), np.float64)
        t[0], t[-1] = (t_max, t_min) if n > 1 else (t_max, t_max)   # the ends exactly, not via the round trip
    ev = lambda fn: np.asarray(fn(jnp.asarray(t, jnp.float32)), np.float64)
    return _grid(ev(sde.network_time), ev(sde.alpha), ev(sde.sigma), final, 0.0)
