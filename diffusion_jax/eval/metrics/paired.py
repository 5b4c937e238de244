"""Confidence intervals for sampler-comparison tables (numpy / scipy, float64; no JAX).

One cell (a sampler at some NFE): `fd_interval` bootstraps the Frechet distance (FD) of its (N, F) features to a
fixed reference (mu, sigma), resampling within strata (class label, or (seed, label) codes) so every resample keeps
the label counts. Two cells whose samples are *paired* (row i of both started from the same noise and label):
`paired_fd_difference` bootstraps FD(a) - FD(b) with the same indices for both, so the noise they share cancels and
the interval is far narrower than two separate intervals suggest; `paired_mean_difference` does the same with a
t-interval for a per-sample quantity (e.g. the error of each sample against a reference solver). `verdict_text`
turns either into one sentence. FD is in squared feature units; the bootstrap costs one sqrtm (F, F) per resample.
"""
from __future__ import annotations

import math

import numpy as np

from diffusion_jax.eval.metrics.distances import _as_feats, feature_stats, frechet_distance
from diffusion_jax.eval.report import mean_ci


def _check_level(level) -> float:
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level!r}")
    return float(level)


def _as_codes(x, n: int, name: str) -> np.ndarray:
    """x as (n,) array of stratum / class codes; ValueError naming `name` otherwise."""
    x = np.asarray(x)
    if x.ndim != 1 or len(x) != n:
        raise ValueError(f"{name} must be ({n},) codes, one per row of the features, got shape {x.shape}")
    return x


def _check_ref(ref_mu, ref_sigma, f: int) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
    if mu.shape != (f,):
        raise ValueError(f"ref_mu must be ({f},) to match features with F = {f}, got shape {mu.shape}")
    if sigma.shape != (f, f):
        raise ValueError(f"ref_sigma must be ({f}, {f}) to match features with F = {f}, got shape {sigma.shape}")
    return mu, sigma


def weighted_stats(feats, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """feats (N, F) -> (mu (F,), sigma (F, F)), float64, every class present weighted equally.

    labels: (N,) class codes, or None. With labels, row i of class k (n_k rows, K classes present) has weight
    w_i = 1 / (K n_k), so an unbalanced reference set gets the statistics of a balanced one: mu = sum w_i x_i,
    sigma = sum w_i (x_i - mu)(x_i - mu)^T / (1 - sum w_i^2) (the unbiased weighted divisor). labels None ->
    w_i = 1 / N, identical to `distances.feature_stats` (divisor N - 1).
    """
    x = _as_feats(feats, "feats")
    if labels is None:
        return feature_stats(x)
    _, inverse, counts = np.unique(_as_codes(labels, len(x), "labels"), return_inverse=True, return_counts=True)
    w = 1.0 / (len(counts) * counts[inverse])
    denom = 1.0 - float(w @ w)
    if denom <= 0.0:
        raise ValueError(f"weighted_stats needs at least 2 rows to estimate a covariance, got feats {x.shape}")
    mu = w @ x
    xc = x - mu
    return mu, (xc * w[:, None]).T @ xc / denom


def fd_to_reference(feats, ref_mu, ref_sigma) -> float:
    """FD (squared feature units) between N(feature_stats(feats)) and N(ref_mu (F,), ref_sigma (F, F))."""
    x = _as_feats(feats, "feats")
    mu, sigma = _check_ref(ref_mu, ref_sigma, x.shape[1])
    return frechet_distance(*feature_stats(x), mu, sigma)


def _fd_against(ref_mu, ref_sigma):
    """feats -> FD to the fixed reference N(ref_mu, ref_sigma), for many feature sets (the bootstrap's resamples).

    With R = ref_sigma^{1/2} (symmetric, from one eigendecomposition), Tr (S R^2)^{1/2} = Tr (R S R)^{1/2}, the trace
    of the square root of a symmetric PSD matrix: the sum of the square roots of its eigenvalues (`eigvalsh`, about
    ten times faster than scipy's sqrtm of the non-symmetric S ref_sigma, and equal to it up to round-off)."""
    w, v = np.linalg.eigh(ref_sigma)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    tr_ref = float(np.trace(ref_sigma))

    def fd(feats):
        mu, sigma = feature_stats(feats)
        lam = np.linalg.eigvalsh(root @ sigma @ root)
        diff = mu - ref_mu
        return float(diff @ diff + np.trace(sigma) + tr_ref - 2.0 * np.sqrt(np.clip(lam, 0.0, None)).sum())
    return fd


def bootstrap_indices(strata, num_resamples: int, seed: int) -> np.ndarray:
    """(num_resamples, N) int64 row indices, drawn with replacement within each stratum.

    strata: (N,) codes (class label, or (seed, label) codes). Column j of every resample holds a row of the same
    stratum as row j, so each resample keeps the strata counts. Deterministic in `seed` (np.random.default_rng).
    """
    s = np.asarray(strata)
    if s.ndim != 1 or len(s) < 1:
        raise ValueError(f"strata must be (N,) codes with N >= 1, got shape {s.shape}")
    if int(num_resamples) < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples!r}")
    rng = np.random.default_rng(seed)
    out = np.empty((int(num_resamples), len(s)), np.int64)
    _, inverse = np.unique(s, return_inverse=True)
    for k in range(int(inverse.max()) + 1):
        members = np.flatnonzero(inverse == k)
        out[:, members] = members[rng.integers(0, len(members), size=(out.shape[0], len(members)))]
    return out


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def fd_interval(feats, ref_mu, ref_sigma, strata, *, num_resamples: int = 200, seed: int = 0,
                level: float = 0.95) -> dict:
    """FD of feats (N, F) to the reference, with a stratified percentile-bootstrap interval.

    strata: (N,) codes (see `bootstrap_indices`). Returns {"fd": FD of all rows, "lo", "hi", "half": (hi - lo) / 2,
    "n": N, "level"}, squared feature units. The interval is the *basic* bootstrap interval (2 fd - q_hi,
    2 fd - q_lo) of the resampled FDs' quantiles q: the FD estimate is biased upwards by O(Tr(sigma) / N) and each
    resample adds that bias again, so the plain percentile interval would sit above the estimate; reflecting it
    about fd removes that shift (Davison & Hinkley 1997, eq. 5.6).
    """
    x = _as_feats(feats, "feats")
    level = _check_level(level)
    mu, sigma = _check_ref(ref_mu, ref_sigma, x.shape[1])
    idx = bootstrap_indices(_as_codes(strata, len(x), "strata"), num_resamples, seed)
    fd_of = _fd_against(mu, sigma)
    boot = np.array([fd_of(x[i]) for i in idx])
    q_lo, q_hi = _percentiles(boot, level)
    fd = fd_to_reference(x, mu, sigma)
    lo, hi = 2.0 * fd - q_hi, 2.0 * fd - q_lo
    return {"fd": fd, "lo": lo, "hi": hi, "half": (hi - lo) / 2.0, "n": len(x), "level": level}


def _difference(diff: float, lo: float, hi: float, n: int, level: float) -> dict:
    """The dict shared by the paired functions: verdict and the sample count that would separate the cells."""
    half = (hi - lo) / 2.0
    verdict = "better" if hi < 0.0 else "worse" if lo > 0.0 else "not separable"
    n_sep = None
    if verdict == "not separable" and diff != 0.0:
        n_sep = int(math.ceil(n * (half / abs(diff)) ** 2))
    return {"diff": float(diff), "lo": float(lo), "hi": float(hi), "half": float(half), "n": int(n),
            "level": level, "verdict": verdict, "n_to_separate": n_sep}


def paired_fd_difference(feats_a, feats_b, ref_mu, ref_sigma, strata, *, num_resamples: int = 200, seed: int = 0,
                         level: float = 0.95) -> dict:
    """FD(a) - FD(b) to the same reference, bootstrapped with the SAME indices for both cells.

    feats_a, feats_b: (N, F), row i of both paired (same noise and label); strata: (N,) codes shared by both.
    Returns {"diff", "lo", "hi", "half", "n", "level", "verdict", "n_to_separate"} (squared feature units):
    verdict "better" when hi < 0 (a has the lower FD), "worse" when lo > 0, else "not separable"; then, if
    diff != 0, n_to_separate = ceil(n (half / |diff|)^2), the N at which a half-width shrinking as 1 / sqrt(N)
    would exclude 0 (None when separable or diff == 0).
    """
    a, b = _as_feats(feats_a, "feats_a"), _as_feats(feats_b, "feats_b")
    if a.shape != b.shape:
        raise ValueError(f"feats_b must have the shape of feats_a (paired rows), got feats_a {a.shape}, "
                         f"feats_b {b.shape}")
    level = _check_level(level)
    mu, sigma = _check_ref(ref_mu, ref_sigma, a.shape[1])
    idx = bootstrap_indices(_as_codes(strata, len(a), "strata"), num_resamples, seed)
    fd_of = _fd_against(mu, sigma)
    boot = np.array([fd_of(a[i]) - fd_of(b[i]) for i in idx])
    diff = fd_to_reference(a, mu, sigma) - fd_to_reference(b, mu, sigma)
    return _difference(diff, *_percentiles(boot, level), len(a), level)


def _as_values(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"{name} must be (N,) per-sample values with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(x)).sum())} NaN/Inf value(s)")
    return x


def mean_interval(values, *, level: float = 0.95) -> dict:
    """values (N,) -> {"mean", "lo", "hi", "half", "n", "level"}: mean +- t_{(1+level)/2, N-1} std / sqrt(N)."""
    v, level = _as_values(values, "values"), _check_level(level)
    m, half = mean_ci(v, level)
    return {"mean": m, "lo": m - half, "hi": m + half, "half": half, "n": len(v), "level": level}


def paired_mean_difference(values_a, values_b, *, level: float = 0.95) -> dict:
    """Mean of d = a - b over paired samples (values_a, values_b (N,) each, e.g. per-sample solver errors).

    t-interval of the mean of d; same keys and verdict rule as `paired_fd_difference` ("better": hi < 0, i.e. a
    is smaller, smaller being better). Units: those of the values.
    """
    a, b = _as_values(values_a, "values_a"), _as_values(values_b, "values_b")
    if a.shape != b.shape:
        raise ValueError(f"values_b must have the shape of values_a (paired samples), got values_a {a.shape}, "
                         f"values_b {b.shape}")
    m = mean_interval(a - b, level=level)
    return _difference(m["mean"], m["lo"], m["hi"], m["n"], m["level"])


def _fmt(x: float, decimals: int, sign: bool = False) -> str:
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def verdict_text(d: dict, name_a: str, name_b: str, unit: str = "") -> str:
    """One sentence from a `paired_fd_difference` / `paired_mean_difference` dict, e.g.
    'dpmpp_2m better than ddim: -0.21 [-0.30, -0.12] (n = 1000)' or 'ddpm vs ddim: not separable at 95%
    (+0.03 [-0.05, 0.11], n = 1000; about 9,000 samples would separate them)'. Decimals follow the half-width and diff.
    """
    missing = [k for k in ("diff", "lo", "hi", "half", "n", "verdict") if k not in d]
    if missing:
        raise ValueError(f"d must be a paired_*_difference result, missing key(s) {missing}")
    dec = 3  # decimals: enough for 2 digits of the half-width and the first significant digit of diff
    if 0 < d["half"] < math.inf:
        dec = -math.floor(math.log10(d["half"] / 2))
        if d["diff"] != 0:
            dec = max(dec, -math.floor(math.log10(abs(d["diff"]))))
        dec = min(max(dec, 0), 10)
    unit = f" {unit}" if unit else ""
    est = f"{_fmt(d['diff'], dec, True)} [{_fmt(d['lo'], dec)}, {_fmt(d['hi'], dec)}]{unit}"
    if d["verdict"] in ("better", "worse"):
        return f"{name_a} {d['verdict']} than {name_b}: {est} (n = {d['n']})"
    pct = f"{100 * d.get('level', 0.95):g}%"
    tail = ""
    if d.get("n_to_separate"):
        n_sep = int(d["n_to_separate"])
        step = 10 ** max(0, len(str(n_sep)) - 2)  # round up to 2 significant digits
        tail = f"; about {-(-n_sep // step) * step:,} samples would separate them"
    return f"{name_a} vs {name_b}: not separable at {pct} ({est}, n = {d['n']}{tail})"
