"""Checks of what a user hands in as data: images, labels, shapes, counts. Each error names the argument and
the expected form, so a malformed input fails here, not deep inside XLA and not as a silently wrong result.

    check_images(x, "images", channels=3, size=32)        # (N, 32, 32, 3) float in [-1, 1], finite
    check_labels(y, "labels", num=len(x), num_classes=10)  # (N,) int in [0, 10)
    shape = check_shape(shape, "shape")                    # a non-empty tuple of positive ints

TypeError for a wrong type or dtype, ValueError for a wrong shape or value. Concrete arrays (numpy, jax) also
get their values checked (finite, in range); a JAX tracer (inside jit) only its static shape and dtype.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    """True for a JAX tracer (a value inside jit / grad / vmap), whose values are unknown until run time."""
    return isinstance(x, jax.core.Tracer)


def check_int(value, name: str, *, minimum: int = 1) -> int:
    """An int (not a bool) >= minimum, returned as a Python int."""
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= minimum):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_shape(shape, name: str = "shape") -> tuple[int, ...]:
    """A non-empty tuple (or list) of positive ints, e.g. (N, H, W, C); returned as a tuple of Python ints."""
    form = "a non-empty tuple of positive ints such as (N, H, W, C)"
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"{name} must be {form}, got {type(shape).__name__} {shape!r}")
    if not shape or not all(isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) and d > 0
                            for d in shape):
        raise ValueError(f"{name} must be {form}, got {tuple(shape)!r}")
    return tuple(int(d) for d in shape)


def as_array(x, name: str, form: str):
    """x itself if it is a numpy / JAX array (or tracer), else np.asarray(x); TypeError naming `name` if x is
    not numeric data (None, a string, a dict, a ragged list)."""
    if isinstance(x, (np.ndarray, jax.Array)):
        return x
    try:
        a = np.asarray(x)
    except (TypeError, ValueError):
        a = None
    if a is None or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise TypeError(f"{name} must be an array {form}, got {type(x).__name__}")
    return a


def _min_max(x) -> tuple[float, float]:
    """(min, max) of a concrete array as floats; NaN if it holds a NaN, +-inf if it holds an inf."""
    v = np.asarray(x)
    if v.dtype.kind not in "fiub":  # bfloat16 and other extension floats
        v = v.astype(np.float32)
    return float(v.min()), float(v.max())


def check_finite(x, name: str, form: str) -> None:
    """No NaN / Inf in a concrete float array (a tracer is not checked)."""
    if is_traced(x) or not x.size or not jnp.issubdtype(x.dtype, jnp.floating):
        return
    lo, hi = _min_max(x)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(np.size(x) - np.isfinite(np.asarray(x, np.float32)).sum())
        raise ValueError(f"{name} must be finite {form}, got {bad} NaN/Inf value(s) in shape {tuple(x.shape)}")


def check_images(x, name: str, *, channels: int | Sequence[int] | None = None,
                 size: int | tuple[int, int] | None = None, value_range: tuple[float, float] | None = (-1.0, 1.0),
                 uint8: bool = False, min_count: int = 1):
    """Images (N, H, W, C) with N >= min_count and H, W, C >= 1: float (finite, within `value_range` unless it is
    None) or, if `uint8`, also uint8 (any value). channels: the one C allowed, or a sequence of them; size: H = W,
    or (H, W). Returns x as an array (a numpy array unless it was a JAX array)."""
    h, w = (size, size) if isinstance(size, int) else (size or ("H", "W"))
    form = f"(N, {h}, {w}, {channels if isinstance(channels, int) else 'C'})"
    if channels is not None and not isinstance(channels, int):
        form += f" with C in {tuple(channels)}"
    form += " float" + (f" in [{value_range[0]:g}, {value_range[1]:g}]" if value_range else "")
    form += " or uint8" if uint8 else ""
    x = as_array(x, name, form)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or (uint8 and x.dtype == np.uint8)):
        raise TypeError(f"{name} must be {form}, got dtype {x.dtype} (shape {tuple(x.shape)})")
    shape = tuple(x.shape)
    allowed_c = None if channels is None else ((channels,) if isinstance(channels, int) else tuple(channels))
    if (len(shape) != 4 or min(shape[1:]) < 1 or (allowed_c and shape[3] not in allowed_c)
            or (size is not None and shape[1:3] != (h, w))):
        raise ValueError(f"{name} must be {form}, got shape {shape}")
    if shape[0] < min_count:
        raise ValueError(f"{name} must hold at least {min_count} image(s) {form}, got shape {shape}")
    if x.dtype == np.uint8 or is_traced(x) or not x.size:
        return x
    check_finite(x, name, form)
    if value_range is not None:
        lo, hi = _min_max(x)
        if lo < value_range[0] or hi > value_range[1]:
            hint = " ([0, 255] floats? use x / 127.5 - 1)" if hi > 2 else ""
            raise ValueError(f"{name} must be {form}, got values in [{lo:g}, {hi:g}]{hint}")
    return x


def check_labels(y, name: str, *, num: int | None = None, num_classes: int | None = None):
    """Class labels (num,) of an integer dtype, in [0, num_classes) (or >= 0 if num_classes is None); values
    are checked only on a concrete array. Returns y as an array."""
    form = f"({'N' if num is None else num},) int " + (f"in [0, {num_classes})" if num_classes else ">= 0")
    y = as_array(y, name, form)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"{name} must be {form}, got dtype {y.dtype} (shape {tuple(y.shape)})")
    if len(y.shape) != 1 or (num is not None and y.shape[0] != num):
        raise ValueError(f"{name} must be {form}, got shape {tuple(y.shape)}")
    if not is_traced(y) and y.size:
        lo, hi = _min_max(y)
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            raise ValueError(f"{name} must be {form}, got values in [{lo:g}, {hi:g}]")
    return y


def check_mask(mask, name: str, *, size: int | tuple[int, int] | None = None, num: int | None = None,
               need_hole: bool = True, need_known: bool = True):
    """A binary mask of known pixels, 1 = known (kept), 0 = hole (to generate): (H, W), (H, W, 1) or (N, H, W, 1),
    bool, int or float holding only 0 and 1. size: H = W, or (H, W); num: the N a 4-D mask must have (1 is
    always allowed: it broadcasts). A concrete mask must have a non-empty hole (need_hole) and a non-empty known
    region (need_known) in every image. Returns the mask as float32 (1 or N, H, W, 1) (numpy unless it was a JAX
    array; a tracer gets only its shape checked)."""
    h, w = (size, size) if isinstance(size, int) else (size or ("H", "W"))
    form = f"(H, W), (H, W, 1) or ({'N' if num is None else num}, H, W, 1) with H, W = {h}, {w}, values in {{0, 1}}"
    mask = as_array(mask, name, form)
    if not (mask.dtype == np.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)
            or jnp.issubdtype(mask.dtype, jnp.floating)):
        raise TypeError(f"{name} must be {form}, got dtype {mask.dtype}")
    shape = tuple(mask.shape)
    ok = (len(shape) == 2 or (len(shape) in (3, 4) and shape[-1] == 1)) and min(shape, default=0) >= 1
    hw = shape[:2] if len(shape) == 2 else shape[-3:-1]
    if (not ok or (size is not None and hw != (h, w))
            or (len(shape) == 4 and num is not None and shape[0] not in (1, num))):
        raise ValueError(f"{name} must be {form}, got shape {shape}")
    mask4 = mask.reshape((shape[0] if len(shape) == 4 else 1,) + tuple(hw) + (1,))
    if is_traced(mask):
        return mask4.astype(jnp.float32)
    v = np.asarray(mask4, np.float32)
    bad = ~((v == 0) | (v == 1))
    if bad.any():
        found = np.unique(v[bad])[:5]
        raise ValueError(f"{name} must be binary {form}, got {int(bad.sum())} value(s) outside {{0, 1}} such as "
                         f"{[float(f) for f in found]} (threshold it, e.g. mask > 0.5)")
    known = v.reshape(v.shape[0], -1).sum(axis=1)
    if need_hole and np.any(known == v[0].size):
        raise ValueError(f"{name} has no hole (all pixels are 1 = known) in image(s) "
                         f"{np.flatnonzero(known == v[0].size).tolist()[:5]}: there is nothing to generate")
    if need_known and np.any(known == 0):
        raise ValueError(f"{name} has no known pixel (all 0 = hole) in image(s) "
                         f"{np.flatnonzero(known == 0).tolist()[:5]}: that is unconditional sampling")
    return jnp.asarray(v) if isinstance(mask, jax.Array) else v
