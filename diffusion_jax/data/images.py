"""Image helpers shared by the data sources (folders of images, TFDS)."""
from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_resize(im: Image.Image, size: int, mode: str = "RGB") -> np.ndarray:
    """PIL image -> (size, size, C) uint8: convert to `mode`, center-crop to a square, bilinear resize. A 16-bit or
    float image is scaled by its own range first (`unit_array`), not clipped."""
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        im = Image.fromarray(np.round(unit_array(im, "L")[..., 0] * 255).astype(np.uint8), "L")
    im = im.convert(mode)
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.resize((size, size), Image.BILINEAR, box=(left, top, left + s, top + s))
    arr = np.asarray(im, np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}


def unit_array(im: Image.Image, mode: str, what: str = "image") -> np.ndarray:
    """(H, W, C) float32 in [0, 1] of a PIL image in `mode` ("L", "RGB" or "RGBA"), each source mode scaled by its
    own range: 8-bit modes by 255, 16-bit grey (I;16*, also 16-bit PNGs that PIL opens as "I") by 65535, float
    ("F") taken as [0, 1]. ValueError naming `what` and the mode for values outside that range (a 32-bit "I" image
    beyond 16 bits, a float image outside [0, 1])."""
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode == "F":
            if lo < 0 or hi > 1:
                raise ValueError(f"{what} is a floating-point image (mode F) with values in [{lo:g}, {hi:g}]; "
                                 "only [0, 1] has a meaning here: rescale it, or save it as 8- or 16-bit")
            grey = a
        else:
            if lo < 0 or hi > 65535:
                raise ValueError(f"{what} is a 32-bit integer image (mode {im.mode}) with values in [{lo:g}, {hi:g}]"
                                 ", beyond 16 bits: save it as an 8- or 16-bit image")
            grey = a / 65535.0
        grey = grey.astype(np.float32)[..., None]
        out = np.repeat(grey, 3, axis=-1) if mode in ("RGB", "RGBA") else grey
        return np.concatenate([out, np.ones_like(grey)], axis=-1) if mode == "RGBA" else out
    arr = np.asarray(im.convert(mode), np.float32) / 255.0
    return arr.reshape(im.size[1], im.size[0], _CHANNELS[mode])
