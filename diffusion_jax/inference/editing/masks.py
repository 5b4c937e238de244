"""Masks of known pixels, (H, W, 1) float32 of {0, 1}: 1 = known (kept), 0 = hole (generated), as score_sde's
`mask` and RePaint's gt_keep_mask. Outpainting is inpainting with `border_hole`.

    center_hole(32, 0.5)          a centred box of half the height and width is generated
    border_hole(32, 8)            the outer 8 pixels are generated (outpainting), the centre kept
    half_hole(32, "right")        the right half is generated ("left", "right", "top", "bottom")
    random_hole(32, 0.7, seed=0)  each pixel is generated with probability 0.7
"""
from __future__ import annotations

import numpy as np

from diffusion_jax.validate import check_int

SIDES = ("left", "right", "top", "bottom")


def _size(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return check_int(size[0], "size[0]"), check_int(size[1], "size[1]")
    s = check_int(size, "size (an int or (H, W))")
    return s, s


def _fraction(value, name: str) -> float:
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def center_hole(size, fraction: float = 0.5) -> np.ndarray:
    """Hole = the centred box of round(fraction H) x round(fraction W) pixels (at least 1 x 1, less than all)."""
    h, w = _size(size)
    f = _fraction(fraction, "fraction")
    bh, bw = (min(max(1, round(f * n)), n - 1 if n > 1 else 1) for n in (h, w))
    m = np.ones((h, w, 1), np.float32)
    top, left = (h - bh) // 2, (w - bw) // 2
    m[top:top + bh, left:left + bw] = 0.0
    return m


def border_hole(size, width: int) -> np.ndarray:
    """Hole = the outer `width` pixels on every side (outpainting); 2 width < min(H, W) keeps a known centre."""
    h, w = _size(size)
    b = check_int(width, "width")
    if 2 * b >= min(h, w):
        raise ValueError(f"width={b} leaves no known centre in a {h}x{w} image; use width < {(min(h, w) + 1) // 2}")
    m = np.zeros((h, w, 1), np.float32)
    m[b:h - b, b:w - b] = 1.0
    return m


def half_hole(size, side: str = "right") -> np.ndarray:
    """Hole = the `side` half (the larger half for odd sizes is kept)."""
    h, w = _size(size)
    if side not in SIDES:
        raise ValueError(f"side={side!r} is unknown; choose from {SIDES}")
    if (w if side in ("left", "right") else h) < 2:
        raise ValueError(f"a {h}x{w} image has no {side} half to generate")
    m = np.ones((h, w, 1), np.float32)
    if side == "left":
        m[:, :w // 2] = 0.0
    elif side == "right":
        m[:, w - w // 2:] = 0.0
    elif side == "top":
        m[:h // 2] = 0.0
    else:
        m[h - h // 2:] = 0.0
    return m


def random_hole(size, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Hole = each pixel with probability `fraction` (numpy, seeded); at least one known and one hole pixel."""
    h, w = _size(size)
    f = _fraction(fraction, "fraction")
    if h * w < 2:
        raise ValueError(f"a {h}x{w} image cannot hold both a known pixel and a hole")
    rng = np.random.default_rng(seed)
    m = (rng.random((h, w, 1)) >= f).astype(np.float32)
    flat = m.reshape(-1)
    if flat.all() or not flat.any():
        flat[rng.integers(flat.size)] = 1.0 - flat[0]
    return m
