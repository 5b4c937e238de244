"""An isotropic Gaussian mixture with closed-form noised marginals: the exact-score testbed for samplers.

Data x0 ~ p = sum_k w_k N(mu_k, s_k^2 I) in R^d. Under the forward process x = alpha x0 + sigma eps the
marginal stays a mixture (Gaussians are closed under affine maps and convolution):

    p_{alpha,sigma}(x) = sum_k w_k N(x; alpha mu_k, v_k I),     v_k = alpha^2 s_k^2 + sigma^2.

With the responsibilities r_k(x) = w_k N(x; alpha mu_k, v_k I) / p(x) (a softmax of log terms, so stable)

    score(x)       = grad_x log p = sum_k r_k (alpha mu_k - x) / v_k
    E[x0 | x]      = sum_k r_k (mu_k + alpha s_k^2 / v_k (x - alpha mu_k))                (per-component Wiener)
                   = (x + sigma^2 score(x)) / alpha                                        (Tweedie; Efron 2011)
    E[eps | x]     = sum_k r_k sigma (x - alpha mu_k) / v_k = -sigma score(x)

The component forms divide by neither alpha nor sigma, so alpha = 0 (pure noise) and sigma = 0 (the data
itself) both work. The adaptors below turn these into "networks" for the samplers (no training).
"""
from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.objectives.param import PREDICTIONS


def _per_example(v, batch: int, dtype):
    """Scalar, (B,) or (B, 1, ..., 1) -> (B,)."""
    v = jnp.asarray(v, dtype)
    return jnp.broadcast_to(v.reshape(-1) if v.ndim else v, (batch,))


@flax.struct.dataclass
class GaussianMixture:
    """weights (K,) summing to 1, means (K, d), stds (K,) > 0 (isotropic per component)."""

    weights: jax.Array
    means: jax.Array
    stds: jax.Array

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def create(cls, weights, means, stds) -> "GaussianMixture":
        """Validate and normalize. stds may be a scalar (shared by all components)."""
        means = jnp.asarray(means, jnp.float32)
        if means.ndim != 2:
            raise ValueError(f"means must be (K, d), got shape {means.shape}")
        K = means.shape[0]
        w = np.asarray(weights, np.float64)
        s = np.broadcast_to(np.asarray(stds, np.float64), (K,))
        if w.shape != (K,) or not np.all(w >= 0) or w.sum() <= 0:
            raise ValueError(f"weights must be ({K},) non-negative with a positive sum, got {w}")
        if not np.all(s > 0):
            raise ValueError(f"stds must be > 0, got {s}")
        return cls(jnp.asarray(w / w.sum(), jnp.float32), means, jnp.asarray(s, jnp.float32))

    @classmethod
    def random(cls, key, num_components: int, dim: int, *, radius: float = 0.7, std: float = 0.1,
               std_spread: float = 0.5, weight_concentration: float | None = 5.0) -> "GaussianMixture":
        """A mixture whose data lie roughly in [-1, 1] per coordinate, like images.

        Built on the host with numpy, seeded by the key. Means: farthest-point selection of K from 64 K
        candidates uniform in [-radius, radius]^d (well separated also in d = 2).
        stds: std * U(1 - std_spread, 1 + std_spread). Weights: Dirichlet(weight_concentration) (uneven but
        none tiny), or uniform when None.
        """
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())   # host side, fixed by key
        pool = rng.uniform(-radius, radius, (max(64 * num_components, 256), dim))
        idx, dist = [0], np.sum((pool - pool[0]) ** 2, axis=1)
        for _ in range(num_components - 1):
            idx.append(int(np.argmax(dist)))
            dist = np.minimum(dist, np.sum((pool - pool[idx[-1]]) ** 2, axis=1))
        stds = std * rng.uniform(1 - std_spread, 1 + std_spread, num_components)
        weights = (np.ones(num_components) if weight_concentration is None else
                   rng.dirichlet(np.full(num_components, weight_concentration)))
        return cls.create(weights, pool[idx], stds)

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def astype(self, dtype) -> "GaussianMixture":
        return jax.tree.map(lambda a: jnp.asarray(a, dtype), self)

    # ----------------------------------------------------------------------------------- moments, samples
    def mean(self):
        """E[x0] = sum_k w_k mu_k, (d,)."""
        return self.weights @ self.means

    def sample(self, key, n: int, *, return_components: bool = False):
        """n samples (n, d) of the data distribution (and their component indices (n,) if asked)."""
        x, comp = _sample(self, key, n)
        return (x, comp) if return_components else x

    # --------------------------------------------------------------------------------- noised marginals
    def _log_joint(self, x, alpha, sigma):
        """log w_k + log N(x; alpha mu_k, v_k I): (B, K), and v (B, K). x: (B, d); alpha, sigma: (B,)."""
        v = alpha[:, None] ** 2 * self.stds ** 2 + sigma[:, None] ** 2
        # one component at a time: memory B d instead of B K d (d may be thousands), exact differences
        sq = jax.lax.map(lambda mu: jnp.sum((x - alpha[:, None] * mu) ** 2, axis=-1), self.means).T
        return jnp.log(self.weights) - 0.5 * sq / v - 0.5 * self.dim * jnp.log(2 * math.pi * v), v

    def _prepare(self, x, alpha, sigma):
        xf = x.reshape(x.shape[0], -1)
        dtype = jnp.result_type(xf.dtype, self.means.dtype)
        xf = xf.astype(dtype)
        return xf, _per_example(alpha, x.shape[0], dtype), _per_example(sigma, x.shape[0], dtype)

    def log_prob(self, x, alpha=1.0, sigma=0.0):
        """log p_{alpha,sigma}(x), (B,) for x (B, ...) (flattened to (B, d))."""
        xf, a, s = self._prepare(x, alpha, sigma)
        return jax.nn.logsumexp(self._log_joint(xf, a, s)[0], axis=-1)

    def responsibilities(self, x, alpha=1.0, sigma=0.0):
        """p(k | x) under the noised marginal, (B, K)."""
        xf, a, s = self._prepare(x, alpha, sigma)
        return jax.nn.softmax(self._log_joint(xf, a, s)[0], axis=-1)

    def _posterior(self, x, alpha, sigma):
        xf, a, s = self._prepare(x, alpha, sigma)
        logj, v = self._log_joint(xf, a, s)
        return xf, a, s, jax.nn.softmax(logj, axis=-1), v

    def score(self, x, alpha, sigma):
        """grad_x log p_{alpha,sigma}(x) = sum_k r_k (alpha mu_k - x) / v_k, shape of x."""
        xf, a, _, r, v = self._posterior(x, alpha, sigma)
        out = a[:, None] * ((r / v) @ self.means) - jnp.sum(r / v, -1, keepdims=True) * xf
        return out.reshape(x.shape)

    def x0_mean(self, x, alpha, sigma):
        """E[x0 | x] = sum_k r_k (sigma^2 mu_k + alpha s_k^2 x) / v_k, shape of x."""
        xf, a, s, r, v = self._posterior(x, alpha, sigma)
        out = s[:, None] ** 2 * ((r / v) @ self.means) + a[:, None] * ((r / v) @ self.stds ** 2)[:, None] * xf
        return out.reshape(x.shape)

    def eps_mean(self, x, alpha, sigma):
        """E[eps | x] = sum_k r_k sigma (x - alpha mu_k) / v_k = -sigma score, shape of x."""
        xf, a, s, r, v = self._posterior(x, alpha, sigma)
        out = s[:, None] * (jnp.sum(r / v, -1, keepdims=True) * xf - a[:, None] * ((r / v) @ self.means))
        return out.reshape(x.shape)


@functools.partial(jax.jit, static_argnums=2)
def _sample(mixture, key, n):
    k_c, k_z = jax.random.split(key)
    comp = jax.random.categorical(k_c, jnp.log(mixture.weights), shape=(n,))
    z = jax.random.normal(k_z, (n, mixture.dim), mixture.means.dtype)
    return mixture.means[comp] + mixture.stds[comp][:, None] * z, comp


# --------------------------------------------------------------------------------------------------------
# Exact "networks"
# --------------------------------------------------------------------------------------------------------
def alpha_sigma_denoiser(mixture: GaussianMixture, prediction: str = "eps"):
    """f(x, alpha, sigma) -> the exact (MMSE) prediction of kind `prediction` (alpha, sigma scalar or (B,)).

    eps: E[eps | x]; x0: E[x0 | x]; v: alpha E[eps | x] - sigma E[x0 | x]; score: grad log p_{alpha,sigma}(x);
    flow: E[eps - x0 | x], the velocity of the linear interpolant (alpha + sigma = 1; `process.flow`).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is unknown; choose from {PREDICTIONS}")

    def f(x, alpha, sigma):
        if prediction == "eps":
            return mixture.eps_mean(x, alpha, sigma)
        if prediction == "x0":
            return mixture.x0_mean(x, alpha, sigma)
        if prediction == "score":
            return mixture.score(x, alpha, sigma)
        if prediction == "flow":
            return mixture.eps_mean(x, alpha, sigma) - mixture.x0_mean(x, alpha, sigma)
        bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
        a, s = (_per_example(u, x.shape[0], x.dtype).reshape(bshape) for u in (alpha, sigma))
        return a * mixture.eps_mean(x, alpha, sigma) - s * mixture.x0_mean(x, alpha, sigma)
    return f


def discrete_denoise_fn(mixture: GaussianMixture, schedule, prediction: str = "eps"):
    """denoise_fn(x, t) for the samplers: t (B,) DDPM timestep indices (int, or float: see
    `DiscreteSchedule.interpolated_level`), x (B, d) or (B, ...) with prod(...) = d. Returns the exact prediction."""
    f = alpha_sigma_denoiser(mixture, prediction)

    def denoise_fn(x, t):
        alpha, sigma = schedule.interpolated_level(t)
        return f(x, alpha, sigma).astype(x.dtype)
    return denoise_fn


def process_denoise_fn(mixture: GaussianMixture, process, prediction: str = "eps"):
    """denoise_fn(x, t) of a continuous process (`process/sde.py`, `process/flow.py`): t (B,) the network time, read
    back as its level by `process.network_level`. Returns the exact prediction (e.g. "flow" on a RectifiedFlow)."""
    f = alpha_sigma_denoiser(mixture, prediction)

    def denoise_fn(x, t):
        alpha, sigma = process.network_level(t)
        return f(x, alpha, sigma).astype(x.dtype)
    return denoise_fn


def edm_denoiser(mixture: GaussianMixture):
    """D(x, sigma) = E[x0 | x0 + sigma n = x] (Karras et al. 2022, alpha = 1); sigma scalar, (B,) or (B, 1, ...)."""
    return lambda x, sigma: mixture.x0_mean(x, 1.0, sigma)
