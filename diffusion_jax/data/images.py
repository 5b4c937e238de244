"""Image helpers shared by the data sources (folders of images, TFDS)."""
from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_resize(im: Image.Image, size: int, mode: str = "RGB") -> np.ndarray:
    """PIL image -> (size, size, C) uint8: convert to `mode`, center-crop to a square, bilinear resize."""
    im = im.convert(mode)
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.resize((size, size), Image.BILINEAR, box=(left, top, left + s, top + s))
    arr = np.asarray(im, np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr
