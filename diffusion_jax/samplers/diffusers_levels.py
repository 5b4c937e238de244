"""diffusers' noise levels, rebuilt from a scheduler config: the betas, which timesteps `set_timesteps(K)` picks and
the sigmas it pairs with them, as our `Grid` (numpy float64 on the host; no torch, no diffusers).

Notation: abar_t = prod_{s <= t} (1 - beta_s) for the T training timesteps; s_t = sqrt((1 - abar_t) / abar_t), the
"sigma" of diffusers' sigma schedulers (our `Grid.sigma_ve`); a level s maps to VP coordinates by alpha = 1 / sqrt(1
+ s^2), sigma = s alpha (diffusers' `_sigma_to_alpha_sigma_t`).

Timestep selection, for K inference steps (Lin et al. 2024, Table 2, as diffusers writes it):

    leading    (arange(n) * (T' // n)).round() reversed, + steps_offset
    trailing   arange(T', 0, -T / K).round() - 1        (a float arange: for some (T, K) it gives K + 1 values)
    linspace   linspace(0, T' - 1, n) reversed: rounded to integers by the VP schedulers (DDIM, DDPM, PNDM),
               kept fractional by the sigma schedulers (Euler, Heun, LMS, KDPM2)

with n = K, T' = T, except for DPM-Solver, UniPC and DEIS (`plus_one`): n = K + 1 points of which the last (t = 0)
is dropped, and T' = T minus the timesteps whose log-SNR / 2 is below lambda_min_clipped. Sigma conversions
(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas) respace s between s_min and s_max — those of the
selected timesteps for the Euler family, of the whole table for the DPM family, or the config's sigma_min /
sigma_max — and map each s back to a fractional timestep t by linear interpolation of t in log s (`sigma_to_t`).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from diffusion_jax.process.discrete import beta_schedule, rescale_zero_terminal_snr
from diffusion_jax.samplers.grid import MIN_ALPHA_BAR, Grid

# diffusers' beta_schedule / prediction_type names -> ours (also read by the Stable Diffusion importer and the export)
DIFFUSERS_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SPACINGS = ("leading", "trailing", "linspace")
SIGMA_KINDS = ("karras", "exponential", "beta")
KARRAS_RHO = 7.0


def betas_from_config(c) -> np.ndarray:
    """(T,) float64 betas of a config `c` (a `Keys`): trained_betas, or beta_schedule with beta_start / beta_end,
    then rescale_betas_zero_snr (Lin et al. 2024, Alg. 1) where the class has that key."""
    T = c.int("num_train_timesteps", lo=1)
    trained = c["trained_betas"]
    if trained is not None:
        b = np.asarray(trained, np.float64)
        if b.shape != (T,) or not np.all((b > 0) & (b < 1)):
            raise ValueError(f"{c.where}trained_betas must be {T} numbers in (0, 1) (num_train_timesteps), got "
                             f"shape {b.shape}")
        c["beta_schedule"], c["beta_start"], c["beta_end"]          # read, and overridden by trained_betas
    else:
        name = c.choice("beta_schedule", tuple(DIFFUSERS_BETAS))
        start, end = float(c["beta_start"]), float(c["beta_end"])
        b = beta_schedule(DIFFUSERS_BETAS[name], T, start, end)
    if c.get("rescale_betas_zero_snr", False):
        b = rescale_zero_terminal_snr(b)
    return np.asarray(b, np.float64)


def sigma_table(abar: np.ndarray) -> np.ndarray:
    """s_t = sqrt((1 - abar_t) / abar_t) for t = 0 .. T-1 (increasing), abar_{T-1} = 0 replaced by 2^-24."""
    abar = np.where(abar > 0, abar, MIN_ALPHA_BAR)
    return np.sqrt((1.0 - abar) / abar)


def sigma_to_t(s, table: np.ndarray) -> np.ndarray:
    """Fractional timesteps of levels s: t linear in log s between the table's neighbours, clamped to [0, T-1]."""
    return np.interp(np.log(np.maximum(np.asarray(s, np.float64), 1e-10)), np.log(table),
                     np.arange(len(table), dtype=np.float64))


def select(spacing: str, T: int, K: int, offset: int, *, plus_one: bool = False, last: int | None = None,
           round_linspace: bool = True) -> np.ndarray:
    """Descending timesteps of `set_timesteps(K)` (module doc); float64, integral except fractional linspace."""
    last = T if last is None else last
    n = K + 1 if plus_one else K
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n)
        if not round_linspace:
            ts = ts.astype(np.float32)          # diffusers' sigma schedulers: np.linspace(..., dtype=float32)
        ts = (ts.round() if round_linspace else ts)[::-1]
    elif spacing == "leading":
        ts = (np.arange(n) * (last // n)).round()[::-1] + offset
    else:
        ts = np.arange(last, 0, -T / K).round() - 1
        return ts.astype(np.float64)
    ts = ts[:-1] if plus_one else ts
    return np.asarray(ts, np.float64)


def respace_sigmas(kind: str, s_desc: np.ndarray, K: int, s_min=None, s_max=None) -> np.ndarray:
    """K levels from s_max down to s_min (defaults: the ends of s_desc, a descending array): Karras et al. eq. 5
    (rho 7), uniform in log s, or the Beta(0.6, 0.6) quantiles of Lee et al. 2024 (scipy)."""
    s_min = float(s_desc[-1]) if s_min is None else float(s_min)
    s_max = float(s_desc[0]) if s_max is None else float(s_max)
    if kind == "karras":
        ramp = np.linspace(0, 1, K)
        lo, hi = s_min ** (1 / KARRAS_RHO), s_max ** (1 / KARRAS_RHO)
        return (hi + ramp * (lo - hi)) ** KARRAS_RHO
    if kind == "exponential":
        return np.exp(np.linspace(math.log(s_max), math.log(s_min), K))
    import scipy.stats
    return s_min + scipy.stats.beta.ppf(1 - np.linspace(0, 1, K), 0.6, 0.6) * (s_max - s_min)


def vp_grid(abar: np.ndarray, ts: np.ndarray, final_abar: float) -> Grid:
    """Grid of a VP scheduler (DDIM, DDPM, PNDM): integer timesteps ts (K,), alpha = sqrt(abar_t), sigma =
    sqrt(1 - abar_t), then the final level (t = -1) at abar = final_abar (1: the clean end)."""
    idx = np.asarray(ts, np.int64)
    a = np.append(np.sqrt(abar[idx]), math.sqrt(final_abar))
    s = np.append(np.sqrt(1.0 - abar[idx]), math.sqrt(max(1.0 - final_abar, 0.0)))
    return _grid(np.append(idx, -1), a, s)


def ve_grid(ts: np.ndarray, sig: np.ndarray) -> Grid:
    """Grid of a sigma scheduler: network times ts (K,), levels s (K + 1,) float32-rounded as diffusers stores
    them, the last the final level (t = -1); alpha = 1 / sqrt(1 + s^2), sigma = s alpha."""
    s = np.asarray(np.asarray(sig, np.float32), np.float64)
    a = 1.0 / np.sqrt(1.0 + s ** 2)
    return _grid(np.append(np.asarray(ts, np.float64), -1.0), a, s * a)


def edm_grid(sig) -> Grid:
    """Grid of an EDM scheduler: levels sigma (K + 1,) with alpha = 1 (x = x0 + sigma eps); t = sigma (the network
    time of an EDM process), the clean end's t = 0 (a placeholder)."""
    s = np.asarray(sig, np.float64)
    return _grid(s, np.ones_like(s), s)


def _grid(t, a, s) -> Grid:
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float64), jnp.float32)
    return Grid(t=f32(t), alpha=f32(a), sigma=f32(s))
