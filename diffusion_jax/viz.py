"""Image grids as PNG files."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """(N, H, W, C) floats in [-1, 1] -> uint8 in [0, 255] (clipped)."""
    x = np.asarray(images, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """(N, H, W, C) in [-1, 1] -> one (rows*(H+p)+p, nrow*(W+p)+p, C) uint8 image, row-major."""
    x = to_uint8(images)
    n, h, w, c = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = x[i]
    return grid


def save_grid(images, path: str, nrow: int | None = None, min_tile: int = 48) -> str:
    """Write a PNG grid; tiles smaller than `min_tile` pixels are upscaled (nearest) so they can be seen."""
    x = np.asarray(images)
    scale = max(1, int(math.ceil(min_tile / x.shape[1])))
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(x, nrow)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
