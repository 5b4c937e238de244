"""diffusers' FlowMatch schedulers as our flow solvers (samplers/flow.py) on their grids:
FlowMatchEulerDiscreteScheduler (shift, dynamic shifting with the pipeline's mu, shift_terminal, Karras / exponential /
beta sigmas, stochastic sampling) and FlowMatchHeunDiscreteScheduler (shift). Registered in
`diffusers_schedulers.SCHEDULERS`.

Their levels, as set_timesteps builds them: the T training sigmas (T..1) / T, shifted (unless use_dynamic_shifting),
stored in float32; K sigmas from linspace(T sigma_max, T sigma_min, K) / T, shifted again (shift s: s sigma / (1 +
(s - 1) sigma); dynamic: e^mu / (e^mu + (1 / sigma - 1)), or mu / (mu + (1 / sigma - 1)) with time_shift_type
"linear"), stretched to end at shift_terminal, respaced (Karras / exponential / beta), then 0 appended; the network
time is T sigma. x_T = z (init_noise_sigma 1); the model predicts the velocity (prediction "flow").
"""
from __future__ import annotations

import math

import numpy as np

from diffusion_jax.samplers import diffusers_levels as lv
from diffusion_jax.samplers.diffusers_keys import Plan
from diffusion_jax.samplers.grid import Grid


def flow_grid(ts: np.ndarray, sig: np.ndarray) -> Grid:
    """Grid of a FlowMatch scheduler: network times ts (K,), sigmas (K + 1,) float32-rounded as diffusers stores them
    (the last 0); alpha = 1 - sigma."""
    import jax.numpy as jnp

    s = np.asarray(np.asarray(sig, np.float32), np.float64)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Grid(t=f32(np.append(np.asarray(ts, np.float64), 0.0)), alpha=f32(1.0 - s), sigma=f32(s))


def _shift(sigma, shift: float):
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def _levels(c, K: int, mu) -> tuple[np.ndarray, np.ndarray]:
    """(network timesteps (K,), sigmas (K + 1,)) of set_timesteps (module doc)."""
    T = c.int("num_train_timesteps", 1)
    shift = c.number("shift")
    dynamic = "use_dynamic_shifting" in c.defaults and c.flag("use_dynamic_shifting")
    train = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
    if not dynamic:
        train = _shift(train, np.float32(shift)).astype(np.float32)
    sig = np.linspace(float(train[0]) * T, float(train[-1]) * T, K) / T
    linear = "time_shift_type" in c.defaults and c.choice("time_shift_type", ("exponential", "linear")) == "linear"
    if dynamic:
        if mu is None:
            raise c.bad("use_dynamic_shifting", "needs the pipeline's mu (sampler_from_diffusers(..., mu=...): "
                                                "Flux computes it from the image's token count)")
        e = float(mu) if linear else math.exp(float(mu))
        sig = e / (e + (1.0 / sig - 1.0))
    else:
        sig = _shift(sig, shift)
    if "shift_terminal" in c.defaults and c["shift_terminal"]:
        terminal = c.number("shift_terminal")
        sig = 1.0 - (1.0 - sig) / ((1.0 - sig[-1]) / (1.0 - terminal))
    if "invert_sigmas" in c.defaults:
        c.only("invert_sigmas", (False,), "(Mochi's inverted schedule) is not supported")
    kind = None
    if "use_karras_sigmas" in c.defaults:
        kinds = [k for k in ("karras", "exponential", "beta") if c.flag(f"use_{k}_sigmas")]
        if len(kinds) > 1:
            raise c.bad("use_karras_sigmas", f"with {kinds}: diffusers takes one kind of sigmas")
        kind = kinds[0] if kinds else None
    if kind is not None:
        sig = lv.respace_sigmas(kind, sig, K)
    sig = np.asarray(sig, np.float32)
    return (sig * np.float32(T)).astype(np.float64), np.append(sig, 0.0)


def flow_match_euler(c, K: int, mu=None) -> Plan:
    stochastic = c.flag("stochastic_sampling")
    grid = flow_grid(*_levels(c, K, mu))
    return Plan("flow_euler", {"stochastic": True} if stochastic else {}, grid, "flow")


def flow_match_heun(c, K: int, mu=None) -> Plan:
    return Plan("flow_heun", {}, flow_grid(*_levels(c, K, mu)), "flow")


_EULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
          "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
          "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
          "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False}
_PIPELINE = "read by the pipeline to compute mu for dynamic shifting, not by the scheduler"
FLOW_SCHEDULERS = {  # class -> (builder, diffusers' defaults, keys that change nothing here)
    "FlowMatchEulerDiscreteScheduler": (flow_match_euler, _EULER, {k: _PIPELINE for k in (
        "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")}),
    "FlowMatchHeunDiscreteScheduler": (flow_match_heun, {"num_train_timesteps": 1000, "shift": 1.0}, {}),
}
