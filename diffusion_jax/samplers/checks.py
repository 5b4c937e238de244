"""Checks of sampler options, shared by every solver: each raises a ValueError naming `sampler.<name>`.

Options arrive from the command line (`--option s_churn=40`) or a config as Python values, so a solver checks
them before tracing anything: a wrong type or range fails here, not deep inside XLA.
"""
from __future__ import annotations

import math

import numpy as np

from diffusion_jax import validate


def check_number(name: str, value, *, minimum: float = 0.0, strict: bool = False, allow_inf: bool = False) -> float:
    """A real number >= minimum (> minimum if strict; finite unless allow_inf), returned as a float."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and (value > minimum if strict else value >= minimum) and (allow_inf or math.isfinite(value))
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"sampler.{name} must be a {'' if allow_inf else 'finite '}number {bound}, got {value!r}")
    return float(value)


def check_int(name: str, value, *, minimum: int = 0) -> int:
    """An integer (not a bool) >= minimum."""
    return validate.check_int(value, f"sampler.{name}", minimum=minimum)


def check_bool(**flags) -> None:
    """Every keyword's value is a bool: check_bool(return_trajectory=rt, lower_order_final=lof)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"sampler.{name} must be a bool, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """value is one of `choices`."""
    if value not in choices:
        raise ValueError(f"sampler.{name}={value!r} is unknown; choose from {tuple(choices)}")


def check_key(key, why: str):
    """A stochastic sampler was given a key."""
    if key is None:
        raise ValueError(f"sampler.key: {why} draws noise and needs a key; pass a jax.random key")
    return key
