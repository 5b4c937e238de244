"""Common random numbers for SDE solvers: one Brownian path shared by every step count.

A stochastic solver on a `Grid` needs at step i (level i -> i + 1) a standard normal z_i. With noise="independent"
z_i = normal(fold_in(key, i)): two runs at 10 and 20 steps then use unrelated noise. With noise="brownian" every
z_i is a normalized increment of ONE Brownian motion W(tau), a diffrax `VirtualBrownianTree` keyed once
(Li et al. 2020; diffrax's version samples W exactly at any query time, Jelincic, Foster & Kidger 2024):

    z_i = (W(tau_i) - W(tau_{i+1})) / sqrt(tau_i - tau_{i+1}),        tau_i = grid.t[i]  (decreasing),

so the z's of a grid are i.i.d. N(0, I) and a solver's noise term g_i sqrt(dt_i) z_i is Euler-Maruyama's
g_i (W(tau_i) - W(tau_{i+1})) up to the time change dt/dtau, frozen on the step. A grid with 2K steps that
contains the K-step grid's levels sees the same path: the coarse increment is the sum of the two fine ones, so
the 2K-step solution converges to the K-step one's path (strong convergence) instead of being an independent sample.

The time variable tau is the grid's `t` (the network time: DDPM timestep index for discrete schedules, t * 999 for
score_sde's VP, sigma for VE / EDM; the clean end's placeholder -1 or 0 closes the interval). The tree lives on a
fixed span [lo, hi] that every compared grid must share, since diffrax normalizes [lo, hi] to [0, 1]: the default is
the grid's own range (min t, max t), the same for all grids of one schedule with the same ends (continuous_grid;
discrete trailing / linspace / karras / logsnr, which start at T - 1); pass span=(-1, T - 1) for discrete "leading"
grids. tol (default span / 2^20) only sets the tree's depth (its cost per query) and must also be shared.
"""
from __future__ import annotations

import math

import diffrax
import jax
import jax.numpy as jnp

from diffusion_jax.samplers.grid import concrete_or_none

NOISES = ("independent", "brownian")
_DEPTH = 20                      # default tol = (hi - lo) 2^-20: float32 resolves the normalized time to ~2^-24


def check_span(span, tol=None):
    """Validates brownian_span = (lo, hi) with lo < hi (or None) and brownian_tol > 0 (or None)."""
    if span is not None:
        ok = isinstance(span, (tuple, list)) and len(span) == 2
        if not (ok and all(isinstance(v, (int, float)) and math.isfinite(v) for v in span) and span[0] < span[1]):
            raise ValueError(f"sampler.brownian_span must be None or (lo, hi) with finite lo < hi, got {span!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"sampler.brownian_tol must be None or a finite number > 0, got {tol!r}")


def default_span(grid):
    """(min t, max t) of the grid: Python floats for a concrete grid, traced scalars inside jit."""
    t = concrete_or_none(grid.t)
    if t is not None:
        return float(t.min()), float(t.max())
    return jnp.min(grid.t), jnp.max(grid.t)


def brownian_path(key, shape, span, *, tol=None, dtype=jnp.float32) -> diffrax.VirtualBrownianTree:
    """W(tau) on [lo, hi] with values of `shape`, a pure function of (key, span, tol): same key, same path."""
    lo, hi = span
    tol = (hi - lo) * 2.0 ** -_DEPTH if tol is None else tol
    return diffrax.VirtualBrownianTree(lo, hi, tol=tol, shape=jax.ShapeDtypeStruct(tuple(shape), dtype), key=key)


def step_normals(noise: str, key, grid, shape, dtype=jnp.float32, *, span=None, tol=None):
    """The per-step standard normals of a solver: returns (state0, draw) with draw(state, i) -> (z_i, state).

    state carries W(tau_i) for "brownian" (one tree query per step, inside the solver's scan); it is a dummy for
    "independent" (z_i = normal(fold_in(key, i))).
    """
    if noise not in NOISES:
        raise ValueError(f"sampler.noise={noise!r} is unknown; choose from {NOISES}")
    check_span(span, tol)
    shape = tuple(shape)
    if noise == "independent":
        def draw_independent(state, i):
            return jax.random.normal(jax.random.fold_in(key, i), shape, dtype), state
        return jnp.zeros((), dtype), draw_independent

    path = brownian_path(key, shape, default_span(grid) if span is None else span, tol=tol, dtype=dtype)
    tau = grid.t

    def draw_brownian(w_i, i):
        w_next = path.evaluate(tau[i + 1])
        z = (w_i - w_next) / jnp.sqrt(tau[i] - tau[i + 1]).astype(dtype)
        return z.astype(dtype), w_next

    return path.evaluate(tau[0]).astype(dtype), draw_brownian
