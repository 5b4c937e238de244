"""Distances between sets of features (numpy / scipy, float64), in the papers' notation.

Every function takes features as (N, F) arrays (one row per image, any feature extractor) or, for the
Inception Score, (N, C) class probabilities. None of them depends on JAX.

References:
  Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium" (FID).
  Binkowski et al. 2018, "Demystifying MMD GANs" (KID).
  Salimans et al. 2016, "Improved Techniques for Training GANs" (Inception Score).
  Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative Models".
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.special

_PAIRWISE_BATCH = 1024  # rows per block of the (rows, M) distance matrix: 1024 x 10k float64 = 80 MB


def _as_feats(x, name: str) -> np.ndarray:
    """x as (N, F) float64; TypeError if it is not numeric, ValueError if it has another rank or a NaN / Inf."""
    try:
        x = np.asarray(x, np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be (N, F) float features, got {type(x).__name__} ({e})") from None
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, F) features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite (N, F) features, got {int((~np.isfinite(x)).sum())} NaN/Inf "
                         f"value(s) in shape {x.shape}")
    return x


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """feats (N, F) -> (mu (F,), sigma (F, F)): mean and unbiased covariance (divisor N - 1), float64."""
    x = _as_feats(feats, "feats")
    if len(x) < 2:
        raise ValueError(f"feature_stats needs at least 2 rows to estimate a covariance, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    mu*: (F,); sigma*: (F, F). Units: squared feature units. (S1 S2)^{1/2} comes from scipy.linalg.sqrtm;
    if it is not finite (S1 S2 singular), eps * I is added to both covariances and it is recomputed.
    Imaginary parts from round-off are dropped; a large one (> 1e-3 of the trace scale) raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"frechet_distance: shape mismatch, mu1 {mu1.shape}, sigma1 {s1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {s2.shape}; expected (F,), (F, F), (F,), (F, F)")
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(f)
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    tr_covmean = np.trace(covmean)
    scale = max(1.0, abs(tr_covmean.real))
    if abs(tr_covmean.imag) > 1e-3 * scale or np.abs(np.diagonal(covmean).imag).max() > 1e-3 * scale:
        raise ValueError(f"frechet_distance: sqrtm(S1 S2) has a large imaginary part "
                         f"(trace {tr_covmean}); the covariances are probably not PSD")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean.real)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for x (m, d), y (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(feats_a, feats_b, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (x . y / d + 1)^3, over random subsets.

    feats_a (N, F), feats_b (M, F). Each of `num_subsets` draws m = min(subset_size, N, M) rows of each set
    without replacement and computes
        MMD^2_u = sum_{i != j} k(a_i, a_j) / (m (m - 1)) + sum_{i != j} k(b_i, b_j) / (m (m - 1))
                  - 2 sum_{i, j} k(a_i, b_j) / m^2,
    an unbiased estimate (it can be negative). Returns (mean, std) over subsets, in squared feature units.
    """
    a, b = _as_feats(feats_a, "feats_a"), _as_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kid: feature sizes differ, feats_a {a.shape} vs feats_b {b.shape}")
    m = min(int(subset_size), len(a), len(b))
    if m < 2 or num_subsets < 1:
        raise ValueError(f"kid needs >= 2 rows per set and num_subsets >= 1, got {a.shape}, {b.shape}, "
                         f"subset_size={subset_size}, num_subsets={num_subsets}")
    rng = np.random.default_rng(seed)
    vals = np.empty(num_subsets)
    for s in range(num_subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        vals[s] = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return float(vals.mean()), float(vals.std())


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) within each of `splits` contiguous chunks.

    probs: (N, C) class probabilities (rows sum to 1) from any classifier. Returns (mean, std) over chunks;
    1 <= IS <= C (1 for identical predictions, C for confident predictions spread evenly over C classes).
    """
    p = _as_feats(probs, "probs")
    if not 1 <= splits <= len(p):
        raise ValueError(f"inception_score: splits={splits} must be in [1, N={len(p)}]")
    scores = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(axis=0, keepdims=True)
        kl = (scipy.special.xlogy(chunk, chunk) - scipy.special.xlogy(chunk, py)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances x (m, F), y (n, F) -> (m, n)."""
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.sqrt(np.maximum(d2, 0.0))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """(N, F) -> (N,) distance of each row to its k-th nearest other row (the row itself excluded)."""
    radii = np.empty(len(x))
    for i in range(0, len(x), _PAIRWISE_BATCH):
        d = _pairwise_dist(x[i:i + _PAIRWISE_BATCH], x)
        radii[i:i + _PAIRWISE_BATCH] = np.partition(d, k, axis=1)[:, k]  # index 0 is the row itself
    return radii


def _coverage(queries: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of queries (Q, F) inside at least one ball (centers (N, F), radii (N,))."""
    inside = np.zeros(len(queries), bool)
    for i in range(0, len(queries), _PAIRWISE_BATCH):
        d = _pairwise_dist(queries[i:i + _PAIRWISE_BATCH], centers)
        inside[i:i + _PAIRWISE_BATCH] = (d <= radii[None, :] * (1 + 1e-9) + 1e-12).any(axis=1)
    return float(inside.mean())


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN-radius manifolds.

    real_feats (N, F), fake_feats (M, F). The real manifold is the union of balls around each real point with
    radius its distance to its k-th nearest real neighbour (likewise for fake). precision = fraction of fake
    points inside the real manifold; recall = fraction of real points inside the fake manifold; both in [0, 1].
    Distances are computed in blocks of 1,024 rows, so 10k x 10k needs ~80 MB at a time.
    """
    real, fake = _as_feats(real_feats, "real_feats"), _as_feats(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: feature sizes differ, real {real.shape} vs fake {fake.shape}")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"precision_recall: need 1 <= k < min(N, M), got k={k}, real {real.shape}, fake {fake.shape}")
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall
