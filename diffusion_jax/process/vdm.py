"""VDM's noise schedule (Kingma, Salimans, Poole & Ho 2021): gamma(t) = -log SNR(t), monotone increasing on
[0, 1], variance preserving:

    z_t = alpha_t x + sigma_t eps,    alpha_t^2 = sigmoid(-gamma(t)),    sigma_t^2 = sigmoid(gamma(t)).

`LinearGamma` (fixed, gamma_min + (gamma_max - gamma_min) t) and `MonotoneGamma` (learned: VDM's NoiseSchedule_NNet,
linear layers with |weights|) are both `gamma(gamma_params, t)`; `init(key)` gives the params pytree ({} for the
fixed one). `VDMSchedule` is the forward-process protocol (`process/__init__.py`) of a gamma with its params, which
sampling, editing and likelihood use; the VLB that trains it is `objectives/vdm.py`.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LinearGamma:
    """Fixed gamma(t) = gamma_min + (gamma_max - gamma_min) t (VDM's NoiseSchedule_FixedLinear; their CIFAR-10
    defaults gamma_min = -13.3, gamma_max = 5)."""

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def init(self, key):
        return {}

    def __call__(self, params, t):
        return self.gamma_min + (self.gamma_max - self.gamma_min) * jnp.asarray(t, jnp.float32)


@dataclasses.dataclass(frozen=True)
class MonotoneGamma:
    """Learned monotone gamma_eta(t) (VDM's NoiseSchedule_NNet, DenseMonotone layers use |W|):

        gamma~(t) = l1(t) + l3(phi(l2(2t - 1))) / n_features,   phi(h) = 2 (sigmoid(h) - 1/2),
        l(h) = h |W| + b   (l3 without bias),

    increasing in t for every parameter value (|W| >= 0, phi increasing). l1 starts at W = gamma_max - gamma_min,
    b = gamma_min; l2, l3 at N(0, 0.01^2) weights, zero bias, so gamma starts near the linear schedule. VDM learns the
    endpoints gamma(0), gamma(1) too; fixed_endpoints=True instead rescales to exactly [gamma_min, gamma_max]:
    gamma(t) = gamma_min + (gamma_max - gamma_min) (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0)).
    """

    gamma_min: float = -13.3
    gamma_max: float = 5.0
    n_features: int = 1024
    fixed_endpoints: bool = False

    def init(self, key):
        k2, k3 = jax.random.split(key)
        f = self.n_features
        return {"l1": {"w": jnp.full((1, 1), self.gamma_max - self.gamma_min), "b": jnp.full((1,), self.gamma_min)},
                "l2": {"w": 0.01 * jax.random.normal(k2, (1, f)), "b": jnp.zeros((f,))},
                "l3": {"w": 0.01 * jax.random.normal(k3, (f, 1))}}

    def raw(self, params, t):
        """gamma~(t) for t scalar or (B,) -> same shape."""
        t = jnp.asarray(t, jnp.float32)
        h = t.reshape(-1, 1)
        out = h @ jnp.abs(params["l1"]["w"]) + params["l1"]["b"]
        u = (2.0 * h - 1.0) @ jnp.abs(params["l2"]["w"]) + params["l2"]["b"]
        u = 2.0 * (jax.nn.sigmoid(u) - 0.5)
        out = out + (u @ jnp.abs(params["l3"]["w"])) / self.n_features
        return out.reshape(t.shape)

    def __call__(self, params, t):
        g = self.raw(params, t)
        if not self.fixed_endpoints:
            return g
        g0, g1 = self.raw(params, 0.0), self.raw(params, 1.0)
        return self.gamma_min + (self.gamma_max - self.gamma_min) * (g - g0) / (g1 - g0)


def alpha_sigma(gamma):
    """(alpha, sigma) with alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)."""
    return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


@flax.struct.dataclass
class VDMSchedule:
    """The `sde.SDE` interface for a VDM gamma (LinearGamma or MonotoneGamma) with its params ({} when fixed):

        alpha^2 = sigmoid(-gamma),  sigma^2 = sigmoid(gamma),  log_snr = -gamma,
        f = d log alpha / dt = -gamma' sigma^2 / 2,   g^2 = d sigma^2/dt - 2 f sigma^2 = gamma' sigma^2.

    network_time(t) = time_scale (gamma(t) - gamma_min) / (gamma_max - gamma_min), what `vdm_loss` feeds the network
    (gamma_min / gamma_max are the config's, fixed even when the endpoints are learned). t_of_log_snr is closed form
    for LinearGamma and 60 bisection steps on [0, 1] (gamma is increasing) for MonotoneGamma. t_min = 0: VDM
    integrates to t = 0, where the SNR is e^{-gamma(0)}. Params must be concrete arrays (grids read floats)."""

    kind: ClassVar[str] = "vdm"
    discrete: ClassVar[bool] = False
    gamma: LinearGamma | MonotoneGamma = flax.struct.field(pytree_node=False)
    params: dict
    time_scale: float = flax.struct.field(pytree_node=False, default=1000.0)
    t_min: float = flax.struct.field(pytree_node=False, default=0.0)
    t_max: float = flax.struct.field(pytree_node=False, default=1.0)

    def gamma_t(self, t):
        return self.gamma(self.params, jnp.asarray(t, jnp.float32))

    def alpha(self, t):   # via log-sigmoid, so that d log alpha / dt stays accurate where alpha is near 1
        return jnp.exp(0.5 * jax.nn.log_sigmoid(-self.gamma_t(t)))

    def sigma(self, t):
        return jnp.exp(0.5 * jax.nn.log_sigmoid(self.gamma_t(t)))

    def log_snr(self, t):
        return -self.gamma_t(t)

    def t_of_log_snr(self, log_snr):
        g = -jnp.asarray(log_snr, jnp.float32)
        if isinstance(self.gamma, LinearGamma):
            return (g - self.gamma.gamma_min) / (self.gamma.gamma_max - self.gamma.gamma_min)

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            below = self.gamma_t(mid) < g
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 60, halve, (jnp.zeros_like(g), jnp.ones_like(g)))
        return 0.5 * (lo + hi)

    def _gamma_and_slope(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jax.jvp(self.gamma_t, (t,), (jnp.ones_like(t),))

    def f(self, t):
        g, dg = self._gamma_and_slope(t)
        return -0.5 * dg * jax.nn.sigmoid(g)

    def g2(self, t):
        g, dg = self._gamma_and_slope(t)
        return dg * jax.nn.sigmoid(g)

    def network_time(self, t):
        lo, hi = self.gamma.gamma_min, self.gamma.gamma_max
        return self.time_scale * (self.gamma_t(t) - lo) / (hi - lo)

    def network_level(self, t):
        """(alpha, sigma) of network time t: gamma = gamma_min + (t / time_scale) (gamma_max - gamma_min)."""
        lo, hi = self.gamma.gamma_min, self.gamma.gamma_max
        return alpha_sigma(lo + jnp.asarray(t, jnp.float32) / self.time_scale * (hi - lo))

    def truncate(self, strength: float) -> "VDMSchedule":
        return self.replace(t_max=self.t_min + strength * (self.t_max - self.t_min))
