"""Exact distances of a sample set (n, d) to a known Gaussian mixture (float64 numpy on the host).

Every term involving the true distribution p = sum_k w_k N(mu_k, s_k^2 I) is closed form, so only the
samples contribute estimation noise:

    MMD^2  with k(x, y) = exp(-||x - y||^2 / (2 h^2)) (Gretton et al. 2012): Gaussian integrals give
           E_{x~N(mu, s^2 I)} k(x, y) = (h^2 / (h^2 + s^2))^{d/2} exp(-||y - mu||^2 / (2 (h^2 + s^2)))
           E_{x~k, x'~l} k(x, x') = (h^2 / V_kl)^{d/2} exp(-||mu_k - mu_l||^2 / (2 V_kl)),  V_kl = h^2 + s_k^2 + s_l^2
    log-likelihood  log p(x) in closed form.
    Frechet / Gaussian W2  between N(m_p, C_p) (exact moments) and the samples' Gaussian fit (as in FID).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _params(mixture):
    return (np.asarray(mixture.weights, np.float64), np.asarray(mixture.means, np.float64),
            np.asarray(mixture.stds, np.float64))


def _sqdist(a, b):
    return np.maximum(np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T, 0.0)


def _samples(samples):
    x = np.asarray(samples, np.float64)
    return x.reshape(x.shape[0], -1)


def mixture_mmd2(mixture, samples, bandwidth: float, *, return_stderr: bool = False, block: int = 1024):
    """Unbiased squared MMD between `samples` (n, ...) and the mixture, Gaussian kernel of width `bandwidth`.

    MMD^2 = E_pp k - 2 E_pq k + E_qq k: the first term exact, the second the sample mean of the exact
    g(x) = E_{x'~p} k(x, x'), the third the U-statistic over pairs i != j. Its expectation is MMD^2 exactly
    (it can be negative). With return_stderr, also the standard error from the U-statistic variance
    4 (n-2) / (n (n-1)) zeta_1 + 2 / (n (n-1)) zeta_2 (Hoeffding 1948) for H(x, y) = k(x, y) - g(x) - g(y) + E_pp k,
    with zeta_1, zeta_2 estimated from the samples. A bandwidth near the component stds probes the modes,
    near sqrt(d) times the data spread the global shape.
    """
    w, mu, s = _params(mixture)
    x = _samples(samples)
    n, d = x.shape
    if n < 2:
        raise ValueError("mixture_mmd2 needs at least 2 samples")
    h2 = float(bandwidth) ** 2
    v = h2 + s[:, None] ** 2 + s[None, :] ** 2                                       # (K, K)
    e_pp = float(w @ np.exp(0.5 * d * np.log(h2 / v) - _sqdist(mu, mu) / (2 * v)) @ w)
    v1 = h2 + s ** 2                                                                 # (K,)
    g = np.exp(0.5 * d * np.log(h2 / v1) - _sqdist(x, mu) / (2 * v1)) @ w           # (n,)
    sum_k, h1, sum_h2 = 0.0, np.zeros(n), 0.0
    for i in range(0, n, block):
        kb = np.exp(-_sqdist(x[i:i + block], x) / (2 * h2))                          # (b, n)
        kb[np.arange(kb.shape[0]), np.arange(i, i + kb.shape[0])] = 0.0
        hb = kb - g[i:i + block, None] - g[None, :] + e_pp
        hb[np.arange(kb.shape[0]), np.arange(i, i + kb.shape[0])] = 0.0
        sum_k += kb.sum()
        h1[i:i + block] = hb.sum(1) / (n - 1)
        sum_h2 += np.sum(hb * hb)
    mmd2 = e_pp - 2.0 * g.mean() + sum_k / (n * (n - 1))
    if not return_stderr:
        return mmd2
    zeta2 = sum_h2 / (n * (n - 1)) - mmd2 ** 2
    # h1 estimates E_y H(x_i, y) with noise of variance ~ zeta_2 / (n - 1): remove it from the spread of h1
    zeta1 = max(np.var(h1) - zeta2 / (n - 1), 0.0)
    var = 4.0 * (n - 2) / (n * (n - 1)) * zeta1 + 2.0 / (n * (n - 1)) * max(zeta2, 0.0)
    return mmd2, float(np.sqrt(var))


def mean_log_likelihood(mixture, samples) -> dict:
    """Mean log p(x) of the samples under the data distribution (float64): {"nats": per sample,
    "nats_per_dim": per sample and dimension}. Samples far off the modes give large negative values."""
    x = _samples(samples)
    with jax.enable_x64(True):
        lp = np.asarray(mixture.astype(jnp.float64).log_prob(jnp.asarray(x)))
    return {"nats": float(lp.mean()), "nats_per_dim": float(lp.mean() / x.shape[1])}


def mixture_moments(mixture):
    """Exact mean (d,) and covariance factors of the data: Cov = c I + M^T diag(w) M, M = mu - mean (K, d)."""
    w, mu, s = _params(mixture)
    m = w @ mu
    return m, float(w @ s ** 2), mu - m


def gaussian_w2(mixture, samples, *, squared: bool = True) -> float:
    """Frechet distance (2-Wasserstein between Gaussian fits, as FID) of the samples to the mixture:

        W2^2 = ||m_p - m_q||^2 + tr C_p + tr C_q - 2 tr (C_p^{1/2} C_q C_p^{1/2})^{1/2}

    with the mixture's exact (m_p, C_p) and the samples' mean and unbiased covariance C_q = Y^T Y,
    Y = (X - m_q) / sqrt(n - 1). No d x d matrix is formed: C_p^{1/2} = sqrt(c) I + U diag(sqrt(c + lam) - sqrt(c)) U^T
    from the K x K eigenproblem of its low-rank part, and tr (C_p^{1/2} C_q C_p^{1/2})^{1/2} is the nuclear
    norm (sum of singular values) of Y C_p^{1/2}, an n x d matrix, from the eigenvalues of its smaller Gram
    matrix: O(n d min(n, d) + min(n, d)^3), about a second at n = 1000, d = 3072.
    Like FID it is biased upwards at finite n, strongly when n < d (C_q then has rank n - 1 while C_p is
    full rank); compare samplers at equal n, and prefer n >= d.
    """
    m_p, c, M = mixture_moments(mixture)
    w = np.asarray(mixture.weights, np.float64)
    x = _samples(samples)
    n, d = x.shape
    m_q = x.mean(0)
    Y = (x - m_q) / np.sqrt(n - 1)
    Q, R = np.linalg.qr(M.T)                                                          # (d, K), (K, K)
    lam, V = np.linalg.eigh(R @ np.diag(w) @ R.T)
    U = Q @ V
    root = np.sqrt(c + np.maximum(lam, 0.0)) - np.sqrt(c)
    Z = np.sqrt(c) * Y + ((Y @ U) * root) @ U.T                                       # Y C_p^{1/2}
    gram = Z @ Z.T if n <= d else Z.T @ Z                # nonzero eigenvalues = squared singular values of Z
    cross = float(np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh(gram), 0.0))))
    tr_p = c * d + float(np.sum(w * np.sum(M * M, 1)))
    w2 = float(np.sum((m_p - m_q) ** 2) + tr_p + np.sum(Y * Y) - 2.0 * cross)
    return w2 if squared else float(np.sqrt(max(w2, 0.0)))


def moment_errors(mixture, samples) -> dict:
    """mean_rmse: ||mean_q - mean_p|| / sqrt(d); trace_cov_rel: tr C_q / tr C_p - 1; occupancy_tv: total
    variation 1/2 sum_k |occ_k - w_k| between the weights and the samples' mean responsibilities p(k | x)."""
    m_p, c, M = mixture_moments(mixture)
    w = np.asarray(mixture.weights, np.float64)
    x = _samples(samples)
    with jax.enable_x64(True):
        occ = np.asarray(mixture.astype(jnp.float64).responsibilities(jnp.asarray(x))).mean(0)
    tr_p = c * x.shape[1] + float(np.sum(w * np.sum(M * M, 1)))
    return {"mean_rmse": float(np.linalg.norm(x.mean(0) - m_p) / np.sqrt(x.shape[1])),
            "trace_cov_rel": float(np.sum(np.var(x, 0, ddof=1)) / tr_p - 1.0),
            "occupancy_tv": float(0.5 * np.sum(np.abs(occ - w)))}
