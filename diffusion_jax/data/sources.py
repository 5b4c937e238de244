"""Offline image sources: sklearn digits, Fashion-MNIST (IDX files), an image folder; and `load_source`.

All sources hold their images in memory and return float32 NHWC images in [-1, 1] from ``get``.
Resizing is bilinear (PIL, antialiased when shrinking) from the native size straight to
``image_size``; nothing is padded. Loaded arrays are cached per (source, path, split, image_size).
"""
from __future__ import annotations

import functools
import gzip
import os
import zlib
from typing import Sequence

import numpy as np
from PIL import Image, features

from diffusion_jax.data.images import center_crop_resize
from diffusion_jax.data.pairs import load_pairs
from diffusion_jax.data.pipeline import DataConfig, Source, check_indices
from diffusion_jax.validate import check_images, check_int, check_labels

DIGITS_TEST_FRACTION = 0.1  # fixed hold-out for split="test", independent of data.seed
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp") + ((".webp",) if features.check("webp") else ())


class ArraySource:
    """In-memory source. images: (N >= 1, H, W, C) uint8 in [0, 255] or float in [-1, 1] (kept as float32);
    labels: (N,) int in [0, num_classes) or None. ``get`` returns float32 images in [-1, 1] and int32 labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
                 num_classes: int | None = None, class_names: Sequence[str] | None = None):
        images = np.asarray(check_images(images, "images", uint8=True))
        if images.dtype != np.uint8:
            images = images.astype(np.float32, copy=False)
        if num_classes is not None:
            num_classes = check_int(num_classes, "num_classes", minimum=1)
        if labels is not None:
            labels = np.asarray(check_labels(labels, "labels", num=len(images), num_classes=num_classes))
        self._images, self._labels = images, None if labels is None else labels.astype(np.int32)
        self.num_examples = int(len(images))
        self.image_shape = tuple(int(d) for d in images.shape[1:])
        if labels is not None and num_classes is None:
            num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.num_classes = None if labels is None else num_classes
        self.class_names = None if class_names is None else tuple(class_names)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """indices: (B,) ints in [0, N) -> {"image": (B,H,W,C) float32 [-1,1], "label": (B,) int32}."""
        idx = check_indices(indices, self.num_examples)
        img = self._images[idx]
        img = img.astype(np.float32) * np.float32(2 / 255) - 1 if img.dtype == np.uint8 else img.copy()
        out = {"image": img}
        if self._labels is not None:
            out["label"] = self._labels[idx]
        return out


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # arrays are shared through the cache
    return a


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) float32 -> (N, size, size, C) float32, bilinear per channel (PIL mode "F")."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images.astype(np.float32)
    out = np.empty((n, size, size, c), np.float32)
    for i in range(n):
        for ch in range(c):
            im = Image.fromarray(np.ascontiguousarray(images[i, :, :, ch], np.float32), mode="F")
            out[i, :, :, ch] = np.asarray(im.resize((size, size), Image.BILINEAR))
    return out


@functools.lru_cache(maxsize=8)
def _digits_arrays(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32)[..., None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    perm = np.random.default_rng(0).permutation(len(images))
    n_test = int(round(DIGITS_TEST_FRACTION * len(images)))
    idx = np.sort(perm[:n_test] if split == "test" else perm[n_test:])
    images = np.clip(resize_images(images[idx], image_size), -1.0, 1.0)
    return _readonly(images), _readonly(d.target[idx].astype(np.int32))


def load_digits(split: str = "train", image_size: int = 16) -> ArraySource:
    """sklearn digits (1,797 8x8 grayscale, 10 classes) -> images (N, S, S, 1) in [-1, 1].

    split="test" is a fixed 10% hold-out (180 examples: the first 180 of
    ``np.random.default_rng(0).permutation(1797)``, kept in original order); "train" is the other 1,617.
    """
    if split not in ("train", "test"):
        raise ValueError(f"data.split={split!r} invalid for data.name='digits'; choose from ('train', 'test')")
    images, labels = _digits_arrays(split, check_int(image_size, "data.image_size"))
    return ArraySource(images, labels, 10, [str(i) for i in range(10)])


def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (gzip-compressed if the name ends in .gz) of unsigned bytes -> uint8 array."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"corrupt IDX file {path}: cannot read/decompress it ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise ValueError(f"corrupt IDX file {path}: bad magic number {data[:4].hex()} "
                         "(expected 0000080N: unsigned bytes, N dims)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"corrupt IDX file {path}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"corrupt IDX file {path}: header says shape {shape} ({int(np.prod(shape))} bytes) "
                         f"but {body.size} data bytes follow")
    return body.reshape(shape)


def _find_idx(data_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: tried {os.path.join(data_dir, stem + '.gz')} (and without .gz). "
        f"Fix: `apt-get install -y dataset-fashion-mnist` (installs to {FASHION_MNIST_DIR}) "
        "or set data.data_dir=<directory holding the IDX files>"
    )


@functools.lru_cache(maxsize=4)
def _fashion_arrays(data_dir: str, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    img_path, lbl_path = (_find_idx(data_dir, stem) for stem in _FASHION_FILES[split])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"corrupt Fashion-MNIST files {img_path} {images.shape} / {lbl_path} {labels.shape}: "
                         "expected (N, H, W) images and (N,) labels")
    if image_size == images.shape[1] == images.shape[2]:
        return _readonly(images[..., None].copy()), _readonly(labels.astype(np.int32))  # uint8, exact
    x = images[..., None].astype(np.float32) / 127.5 - 1.0
    return _readonly(np.clip(resize_images(x, image_size), -1, 1)), _readonly(labels.astype(np.int32))


def load_fashion_mnist(split: str = "train", image_size: int = 28, data_dir: str | None = None) -> ArraySource:
    """Fashion-MNIST from IDX files (60,000 train / 10,000 test, 28x28, 10 classes) -> (N, S, S, 1) in [-1, 1].

    A size other than 28 (e.g. 32 for a U-Net with 3 downsamplings) is reached by bilinear resize, not
    padding. data_dir defaults to /usr/share/datasets/fashion-mnist (Debian `dataset-fashion-mnist`).
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"data.split={split!r} invalid for data.name='fashion_mnist'; choose from ('train', 'test')")
    data_dir = os.path.abspath(_check_dir(data_dir or FASHION_MNIST_DIR))
    images, labels = _fashion_arrays(data_dir, split, check_int(image_size, "data.image_size"))
    return ArraySource(images, labels, 10, FASHION_MNIST_CLASSES)


def _check_dir(data_dir) -> str:
    """data_dir as a str path; TypeError naming data.data_dir if it is not a non-empty str or os.PathLike."""
    if not (isinstance(data_dir, (str, os.PathLike)) and os.fspath(data_dir)):
        raise TypeError(f"data.data_dir must be a non-empty path (str or os.PathLike), got {data_dir!r}")
    return os.fspath(data_dir)


def _scan_folder(root: str) -> tuple[list[str], list[int] | None, list[str] | None]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"no images found under data.data_dir={root!r} "
                                f"(looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
    tops = [os.path.relpath(f, root).split(os.sep)[0] for f in files]
    if any(os.path.isfile(os.path.join(root, t)) for t in tops):
        return files, None, None  # images directly under root -> unlabelled
    names = sorted(set(tops))
    lookup = {n: i for i, n in enumerate(names)}
    return files, [lookup[t] for t in tops], names


@functools.lru_cache(maxsize=2)
def _folder_arrays(root: str, image_size: int, mode: str = "RGB"):
    files, labels, names = _scan_folder(root)
    from tqdm.auto import tqdm

    images = np.empty((len(files), image_size, image_size, len(mode)), np.uint8)
    for i, path in enumerate(tqdm(files, desc=f"loading {root}", disable=len(files) < 1000)):
        try:
            with Image.open(path) as im:
                images[i] = center_crop_resize(im, image_size, mode)
        except Exception as e:  # PIL raises several types for bad files
            raise ValueError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e
    lab = None if labels is None else _readonly(np.asarray(labels, np.int32))
    return _readonly(images), lab, names


def load_folder(data_dir: str, image_size: int = 64, grayscale: bool = False) -> ArraySource:
    """All images under ``data_dir`` (recursive; .png .jpg .jpeg .bmp, .webp if PIL supports it) as RGB
    (N, S, S, 3), or grey (N, S, S, 1) when ``grayscale``, center-cropped to a square, then bilinear-resized;
    loaded eagerly, stored as uint8.

    Labels: if every image lies inside a top-level subfolder (none directly in ``data_dir``), the
    subfolder names sorted alphabetically are the classes 0..K-1 (deeper nesting keeps the top-level
    name) and ``class_names`` lists them; otherwise the source is unlabelled. Files are ordered by path.
    Decoded arrays are cached per (path, image_size) for the process; ``_folder_arrays.cache_clear()``
    forgets them if the folder changes.
    """
    root = os.path.abspath(_check_dir(data_dir))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.data_dir={root!r} does not exist or is not a directory")
    images, labels, names = _folder_arrays(root, check_int(image_size, "data.image_size"), "L" if grayscale else "RGB")
    return ArraySource(images, labels, None if names is None else len(names), names)


def load_source(config: DataConfig) -> Source:
    """Validate ``config`` and build its source (float32 NHWC in [-1, 1] from ``get``)."""
    config.validate()
    if config.name.startswith("tfds:"):
        from diffusion_jax.data.tfds_source import load_tfds

        return load_tfds(config.name[len("tfds:"):], config.split, config.image_size, config.data_dir)
    loaders = {
        "digits": lambda c: load_digits(c.split, c.image_size),
        "fashion_mnist": lambda c: load_fashion_mnist(c.split, c.image_size, c.data_dir),
        "folder": lambda c: load_folder(c.data_dir, c.image_size, c.grayscale),
        "pairs": lambda c: load_pairs(c.data_dir, c.image_size),
    }
    return loaders[config.name](config)
