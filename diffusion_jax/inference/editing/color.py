"""Colorization by score_sde's decoupled method (Song et al. 2021, app. I.3).

A gray image is the mean over channels, g = x 1 / C. Take an orthogonal per-pixel change of colour coordinates
u = x M whose first column is 1 / sqrt(C) (the Helmert matrix; for C = 3 score_sde's M up to the signs of the
other columns):

    M[:, 0] = 1 / sqrt(C),    M[:, k] = (1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1))   (k ones), k = 1 .. C - 1

so u_0 = sqrt(C) g carries the gray image and u_1..u_{C-1} the colour. Colorization is imputation of
u_1..u_{C-1} given u_0: a `Known` with values (sqrt(C) g, 0, ..., 0), mask (1, 0, ..., 0) on the channel axis and
transform M, sampled by any method of this package. Orthogonality keeps the noise isotropic in u (known.py).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from diffusion_jax.inference.editing.known import Known, known


def gray_transform(channels: int = 3) -> np.ndarray:
    """The (C, C) float64 Helmert matrix M above (orthogonal; column 0 = 1 / sqrt(C))."""
    if not (isinstance(channels, int) and channels >= 2):
        raise ValueError(f"colorization needs images of >= 2 channels, got {channels!r}")
    m = np.zeros((channels, channels))
    m[:, 0] = 1.0 / np.sqrt(channels)
    for k in range(1, channels):
        m[:k, k] = 1.0
        m[k, k] = -k
        m[:, k] /= np.sqrt(k * (k + 1))
    return m


def gray(images):
    """The gray image g = mean over channels, (N, H, W, 1)."""
    return images.mean(axis=-1, keepdims=True)


def gray_known(images, channels: int = 3, num: int | None = None) -> Known:
    """The `Known` of colorizing `images` (N, H, W, 1) gray or (N, H, W, channels) colour (its gray is used)."""
    c = images.shape[-1]
    if c not in (1, channels):
        raise ValueError(f"colorize takes gray (1 channel) or {channels}-channel images, got {c} channels")
    g = gray(jnp.asarray(images, jnp.float32))
    values = jnp.concatenate([math.sqrt(channels) * g, jnp.zeros(g.shape[:-1] + (channels - 1,), g.dtype)], -1)
    mask = np.zeros((1, 1, 1, channels), np.float32)
    mask[..., 0] = 1.0
    return known(values, mask, gray_transform(channels), num=num)
