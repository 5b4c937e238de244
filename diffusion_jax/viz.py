"""Image grids as PNG files."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from diffusion_jax.fileio import atomic_write
from diffusion_jax.validate import check_images, check_int


def to_uint8(images) -> np.ndarray:
    """(N, H, W, C) finite floats in [-1, 1] -> uint8 in [0, 255] (clipped); uint8 images are returned as they are."""
    x = np.asarray(check_images(images, "images", value_range=None, uint8=True, min_count=0))
    if x.dtype == np.uint8:
        return x
    return np.clip(np.round((x.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """(N >= 1, H, W, C) in [-1, 1] (or uint8) -> one (rows*(H+p)+p, nrow*(W+p)+p, C) uint8 image, row-major."""
    check_images(images, "images", value_range=None, uint8=True)
    x = to_uint8(images)
    n, h, w, c = x.shape
    nrow = int(math.ceil(math.sqrt(n))) if nrow is None else check_int(nrow, "nrow", minimum=1)
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = x[i]
    return grid


def save_grid(images, path: str, nrow: int | None = None, min_tile: int = 48) -> str:
    """Write a PNG grid of (N >= 1, H, W, C in {1, 3, 4}) images in [-1, 1] (or uint8); tiles smaller than
    `min_tile` pixels are upscaled (nearest) so they can be seen."""
    x = np.asarray(check_images(images, "images", channels=(1, 3, 4), value_range=None, uint8=True))
    scale = max(1, int(math.ceil(min_tile / x.shape[1])))
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(x, nrow)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))   # never a half-written PNG
    return path
