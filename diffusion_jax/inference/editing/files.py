"""Images and masks from PNG (or any format PIL reads) files, for the command line. Nothing is resized: a file of
another size than the model's is refused, naming the file and both sizes. Each file is scaled by its own range
(8-bit by 255, 16-bit by 65535: `data.images.unit_array`).

    image = load_image("photo.png", size=32, channels=3)     # (1, 32, 32, 3) float32 in [-1, 1]
    mask = load_mask("mask.png", size=32)                    # (1, 32, 32, 1) float32 in {0, 1}, white = known
    control = read_control("edges.png", size=32, channels=1) # (1, 32, 32, 1) float32 in [0, 1] (ControlNet)
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from diffusion_jax.data.images import unit_array
from diffusion_jax.validate import check_int, check_mask

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _hw(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return check_int(size[0], "size[0]"), check_int(size[1], "size[1]")
    s = check_int(size, "size")
    return s, s


def _open(path: str, what: str, size) -> Image.Image:
    h, w = _hw(size)
    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {path!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"{what} file {path!r} is not an image PIL can read ({e})") from None
    if im.size != (w, h):
        raise ValueError(f"{what} file {path!r} is {im.size[1]}x{im.size[0]} (HxW) but the model takes {h}x{w}; "
                         f"resize or crop it first (editing never resizes)")
    return im


def load_image(path: str, *, size, channels: int) -> np.ndarray:
    """(1, H, W, channels) float32 in [-1, 1] (2 x / range - 1). Converted to L (1 channel), RGB (3) or RGBA (4)
    as PIL does (colour -> L is ITU-R 601 luma); a 16-bit grey file keeps its 16 bits."""
    if channels not in _MODES:
        raise ValueError(f"channels must be one of {sorted(_MODES)}, got {channels!r}")
    x = unit_array(_open(path, "image", size), _MODES[channels], f"image file {path!r}")
    return (x * 2.0 - 1.0)[None]


def load_mask(path: str, *, size, invert: bool = False, threshold: int | None = None) -> np.ndarray:
    """(1, H, W, 1) float32 mask of known pixels from a gray (or colour: converted to L) file: white (255) = known,
    black (0) = hole, as RePaint's gt_keep_mask; invert=True for the diffusers / Stable Diffusion convention (white
    = the area to fill). Other gray values are refused unless `threshold` is given (known = value >= threshold)."""
    im = _open(path, "mask", size)
    if "A" in im.mode or "transparency" in im.info:
        how = "a transparent palette colour" if "transparency" in im.info else "an alpha channel"
        raise ValueError(f"mask file {path!r} has transparency (mode {im.mode}, {how}), which a mask cannot mean: "
                         "save it black-and-white without transparency")
    v = unit_array(im, "L", f"mask file {path!r}")[..., 0] * 255.0
    if threshold is not None:
        v = np.where(v >= check_int(threshold, "threshold", minimum=0), 255.0, 0.0)
    elif not np.isin(v, (0.0, 255.0)).all():
        found = np.unique(v[~np.isin(v, (0.0, 255.0))])
        raise ValueError(f"mask file {path!r} must be black (0) and white (255) only; it has {found.size} other gray "
                         f"value(s) such as {found[:5].astype(int).tolist()} (antialiased?): give a threshold")
    m = (v / 255.0)[None, :, :, None]
    if invert:
        m = 1.0 - m
    return check_mask(m, f"mask file {path!r}", size=_hw(size))


def read_control(path: str, size: int, channels: int) -> np.ndarray:
    """A control image file as (1, size, size, channels) float32 in [0, 1]; a colour file for a 1-channel ControlNet
    (an edge map) is refused unless its channels are equal (a gray image saved as RGB)."""
    control = (load_image(path, size=size, channels=3 if channels == 1 else channels) + 1.0) / 2.0
    if channels == 1:
        if not (np.array_equal(control[..., 0], control[..., 1]) and np.array_equal(control[..., 0], control[..., 2])):
            with Image.open(path) as im:
                mode = im.mode
            raise ValueError(f"control file {path!r} is a colour image (mode {mode}) but this ControlNet takes 1 "
                             "channel (model.conditioning_channels=1, e.g. an edge map): give a gray image")
        control = control[..., :1]
    return control.astype(np.float32)
