"""A coupling of noise and samples drawn by a trained model's ODE, what reflow trains on (Liu et al. 2023, sec. 2.3):

    (eps_i, x_i),  x_i = ODE-solve of the trained model from x_T = eps_i  (`train/reflow.draw_pairs` writes them)

A 2-rectified flow is the flow objective on these pairs instead of independent (x_0, eps): the same interpolant
x_t = (1 - sigma) x_i + sigma eps_i, whose straight paths now cross less, so its ODE needs fewer steps.

File: one .npz holding "noise" and "image" (N, H, W, C) float32, "label" (N,) int32 (a class-conditional model's
labels; absent otherwise) and "meta", a JSON string (the source workdir, its step, the sampler, steps, seed).
get(indices) -> {"image": (B, H, W, C) float32, "noise": (B, H, W, C) float32, "label": (B,) int32 if labelled}.
"""
from __future__ import annotations

import json
import os

import numpy as np

from diffusion_jax.data.pipeline import check_indices

PAIR_KEYS = ("noise", "image")


class PairSource:
    """noise, images: (N >= 1, H, W, C) float; labels: (N,) int or None; num_classes: the model's class count."""

    def __init__(self, noise: np.ndarray, images: np.ndarray, labels: np.ndarray | None = None,
                 num_classes: int | None = None, meta: dict | None = None):
        noise, images = np.asarray(noise, np.float32), np.asarray(images, np.float32)
        if images.ndim != 4 or not len(images):
            raise ValueError(f"pairs: image must be (N >= 1, H, W, C), got shape {images.shape}")
        if noise.shape != images.shape:
            raise ValueError(f"pairs: noise {noise.shape} and image {images.shape} must have one shape")
        if not (np.isfinite(noise).all() and np.isfinite(images).all()):
            raise ValueError("pairs: noise and image must be finite (the trained model diverged on some x_T?)")
        n = len(images)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
                raise ValueError(f"pairs: label must be ({n},) non-negative ints, got {labels.shape} {labels.dtype}")
            labels = labels.astype(np.int32)
            num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        self._noise, self._images, self._labels = noise, images, labels
        self.num_examples = n
        self.image_shape = tuple(int(d) for d in images.shape[1:])
        self.num_classes = None if labels is None else num_classes
        self.meta = dict(meta or {})

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = check_indices(indices, self.num_examples)
        out = {"image": self._images[idx].copy(), "noise": self._noise[idx].copy()}
        if self._labels is not None:
            out["label"] = self._labels[idx]
        return out


def save_pairs(path: str, noise, images, labels=None, meta: dict | None = None) -> str:
    """Write a pair file (module doc) atomically (a temporary file renamed over `path`); returns `path`."""
    PairSource(noise, images, labels, meta=meta)   # the same checks as reading it back
    arrays = {"noise": np.asarray(noise, np.float32), "image": np.asarray(images, np.float32),
              "meta": np.asarray(json.dumps(meta or {}, sort_keys=True))}
    if labels is not None:
        arrays["label"] = np.asarray(labels, np.int32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:   # a failed write (a full disk) leaves neither a partial file nor the temporary one
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_pairs(path, image_size: int | None = None, num_classes: int | None = None) -> PairSource:
    """The PairSource of a pair file; ValueError naming the file when it is not one or its images are not
    image_size x image_size (pairs are drawn at the model's resolution and are never resized)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.data_dir={path!r}: no pair file there; draw one from a trained flow with "
                                "`diffusion-jax reflow --workdir W --out PAIRS.npz`")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:   # not a zip, a truncated file, a pickled array: all "not a pair file"
        raise ValueError(f"{path!r} is not a readable .npz pair file: {e}") from e
    missing = [k for k in PAIR_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path!r} is not a reflow pair file: it lacks {missing} (has {sorted(arrays)})")
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    try:
        source = PairSource(arrays["noise"], arrays["image"], arrays.get("label"), num_classes, meta)
    except ValueError as e:
        raise ValueError(f"{path!r}: {e}") from e
    h, w, _ = source.image_shape
    if image_size is not None and (h, w) != (image_size, image_size):
        raise ValueError(f"data.image_size={image_size} but the pairs in {path!r} are {h}x{w}: pairs are drawn at the "
                         f"model's resolution and never resized; set data.image_size={h}")
    return source
