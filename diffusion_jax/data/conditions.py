"""Control images computed from images (the conditions a ControlNet learns), offline, in numpy on the host.

    name    channels     control image
    sobel   1            binary edges: |Sobel gradient| of the gray image in [0, 1] (scaled so a unit step gives 1)
                         above `threshold` (default 0.5)
    canny   1            binary Canny edges (scikit-image, `sigma`, hysteresis thresholds as fractions of the max)
    lowres  C (image's)  the image averaged over `factor` x `factor` blocks and repeated back to full size (a
                         super-resolution-like control), mapped to [0, 1]

Every condition takes images (N, H, W, C) float in [-1, 1] and returns (N, H, W, k) float32 in [0, 1], diffusers'
range for control images. The edge maps are also what `eval` measures generated images with (edge IoU, Chamfer).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from scipy import ndimage


def _check(images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 1 or 3) in [-1, 1], got shape {images.shape}")
    return images


def _gray01(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) in [-1, 1] -> (N, H, W) gray in [0, 1] (ITU-R 601 luma for RGB)."""
    x = np.clip((images + 1.0) / 2.0, 0.0, 1.0)
    return x[..., 0] if x.shape[-1] == 1 else x @ np.array([0.299, 0.587, 0.114], np.float32)


def sobel_magnitude(images) -> np.ndarray:
    """(N, H, W) gradient magnitude of the gray image in [0, 1]: hypot(Sobel_x, Sobel_y) / 4 (a unit step edge gives
    1), borders replicated."""
    g = _gray01(_check(images))

    def sobel(derivative_axis, smooth_axis):   # per image: never along the batch axis (ndimage.sobel would smooth it)
        d = ndimage.correlate1d(g, [-1.0, 0.0, 1.0], axis=derivative_axis, mode="nearest")
        return ndimage.correlate1d(d, [1.0, 2.0, 1.0], axis=smooth_axis, mode="nearest")

    return np.hypot(sobel(2, 1), sobel(1, 2)) / 4.0


def sobel_edges(images, threshold: float = 0.5) -> np.ndarray:
    """(N, H, W, 1) float32 in {0, 1}: sobel_magnitude > threshold."""
    if not 0.0 < threshold < 1.5:
        raise ValueError(f"the Sobel threshold must be in (0, 1.5), got {threshold}")
    return (sobel_magnitude(images) > threshold).astype(np.float32)[..., None]


def canny_edges(images, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> np.ndarray:
    """(N, H, W, 1) float32 in {0, 1}: scikit-image's Canny on the gray image in [0, 1] (low / high: hysteresis
    thresholds on the gradient magnitude)."""
    try:
        from skimage.feature import canny
    except ImportError as e:
        raise ImportError("the 'canny' condition needs scikit-image: pip install 'diffusion-jax[images]'") from e
    g = _gray01(_check(images)).astype(np.float64)
    out = np.stack([canny(im, sigma=sigma, low_threshold=low, high_threshold=high) for im in g])
    return out.astype(np.float32)[..., None]


def low_resolution(images, factor: int = 2) -> np.ndarray:
    """(N, H, W, C) float32 in [0, 1]: factor x factor block means, repeated back to H x W."""
    x = _check(images)
    n, h, w, c = x.shape
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"the low-resolution factor must be >= 1 and divide the image size {h}x{w}, got {factor}")
    blocks = x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    up = np.repeat(np.repeat(blocks, factor, axis=1), factor, axis=2)
    return np.clip((up + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Condition:
    fn: Callable[[np.ndarray], np.ndarray]     # images (N, H, W, C) in [-1, 1] -> (N, H, W, k) in [0, 1]
    channels: Callable[[int], int]             # image channels -> k
    about: str


CONDITIONS = {
    "sobel": Condition(sobel_edges, lambda c: 1, "binary Sobel edges (|grad| > 0.5 of a unit step)"),
    "canny": Condition(canny_edges, lambda c: 1, "binary Canny edges (scikit-image, sigma 1)"),
    "lowres": Condition(low_resolution, lambda c: c, "2x2 block means, repeated back to full size"),
}


def make_condition(name: str, images) -> np.ndarray:
    """The control images of condition `name` (CONDITIONS) for images (N, H, W, C) in [-1, 1]."""
    if name not in CONDITIONS:
        raise ValueError(f"condition {name!r} is unknown; choose from {sorted(CONDITIONS)}")
    return CONDITIONS[name].fn(images)


class ControlSource:
    """A source (data.pipeline.Source) whose examples also hold "control" (N, H, W, k) float32 in [0, 1]: the
    condition `name` of every image, computed once here (in chunks of 4,096)."""

    def __init__(self, source, name: str):
        self.source, self.condition = source, name
        self.num_examples, self.image_shape = source.num_examples, source.image_shape
        self.num_classes = source.num_classes
        self.class_names = getattr(source, "class_names", None)
        n = int(source.num_examples)
        self._control = np.concatenate([
            make_condition(name, source.get(np.arange(i, min(i + 4096, n)))["image"]) for i in range(0, n, 4096)])
        self.control_shape = tuple(self._control.shape[1:])

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        out = dict(self.source.get(indices))
        out["control"] = self._control[np.asarray(indices)]
        return out
