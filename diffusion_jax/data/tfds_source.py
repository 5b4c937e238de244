"""Optional TFDS source: random access to *prepared* TFDS datasets, without TensorFlow.

Uses ``tfds.builder(...).as_data_source(split)`` (array_record / parquet files; decoding with PIL), so it
needs ``pip install 'diffusion_jax[tfds]'`` but neither TensorFlow nor network. Nothing is ever
downloaded: prepare the dataset elsewhere, e.g.
``tfds build mnist --file_format=array_record --data_dir=DIR``, and copy DIR over.
Images are decoded lazily in ``get``; any size that is not image_size x image_size is center-cropped to a
square and bilinear-resized (as the folder source does). The grain package is not needed here: `Batches`
does the deterministic shuffling, and a ``TfdsSource`` can also be handed to ``grain.MapDataset.source``.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from diffusion_jax.data.images import center_crop_resize

_INSTALL_HINT = "pip install 'diffusion_jax[tfds]'  (tensorflow-datasets and grain; TensorFlow is not needed)"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"data.name='tfds:...' needs tensorflow_datasets, which is not installed: "
                          f"{_INSTALL_HINT}") from e
    return tfds


class TfdsSource:
    """A prepared TFDS split. ``get(indices)`` -> {"image": (B, S, S, C) float32 in [-1, 1],
    "label": (B,) int32 when the dataset has a ClassLabel "label" feature}. C is the dataset's channel
    count (1 for mnist, 3 for cifar10 / celeb_a; 3 if unspecified)."""

    def __init__(self, data_source, features, image_size: int, name: str):
        image_feature = features["image"]
        channels = image_feature.shape[-1] or 3
        if channels not in (1, 3) or np.dtype(image_feature.np_dtype) != np.uint8:
            raise ValueError(f"tfds:{name}: only uint8 images with 1 or 3 channels are supported, got "
                             f"{image_feature.shape} {image_feature.np_dtype}")
        self._ds, self._name, self._size = data_source, name, int(image_size)
        self._mode = "L" if channels == 1 else "RGB"
        self.num_examples = len(data_source)
        self.image_shape = (self._size, self._size, channels)
        label = features["label"] if "label" in features.keys() else None
        self.num_classes = getattr(label, "num_classes", None)
        self.class_names = tuple(label.names) if self.num_classes is not None else None

    def _to_uint8(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.shape == self.image_shape:
            return image
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        return center_crop_resize(Image.fromarray(image), self._size, self._mode)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """indices: (B,) ints in [0, N) -> {"image": (B,S,S,C) float32 [-1,1], "label": (B,) int32}."""
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        if idx and (min(idx) < 0 or max(idx) >= self.num_examples):
            raise IndexError(f"indices out of range [0, {self.num_examples}): {min(idx)}..{max(idx)}")
        getitems = getattr(self._ds, "__getitems__", None)
        examples = getitems(idx) if getitems else [self._ds[i] for i in idx]
        images = np.stack([self._to_uint8(ex["image"]) for ex in examples]) if idx else \
            np.zeros((0, *self.image_shape), np.uint8)
        out = {"image": images.astype(np.float32) * np.float32(2 / 255) - 1}
        if self.num_classes is not None:
            out["label"] = np.asarray([ex["label"] for ex in examples], np.int32).reshape(-1)
        return out


def load_tfds(name: str, split: str = "train", image_size: int = 32, data_dir: str | None = None) -> TfdsSource:
    """Open prepared TFDS dataset ``name`` (e.g. "mnist", "cifar10", "celeb_a") at ``split``; never downloads.

    data_dir None -> TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    Raises ImportError (TFDS missing), FileNotFoundError (not prepared in data_dir), ValueError (no
    "image" feature, prepared as tfrecord which has no random access).
    """
    tfds = _import_tfds()
    data_dir = None if data_dir is None else os.path.abspath(os.fspath(data_dir))
    where = data_dir or "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    offline = (f"Downloads are impossible offline: prepare it on a machine with network "
               f"(`tfds build {name} --file_format=array_record --data_dir=DIR`), copy DIR here and set "
               "data.data_dir=DIR")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in data.data_dir={where}. {offline}") from e
    if not builder.is_prepared():
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in data.data_dir={where} "
                                f"(looked in {builder.data_dir}). {offline}")
    if "image" not in builder.info.features.keys():
        raise ValueError(f"tfds:{name} has no 'image' feature (features: {list(builder.info.features.keys())})")
    try:
        data_source = builder.as_data_source(split=split)
    except NotImplementedError as e:
        raise ValueError(f"tfds:{name} in {builder.data_dir} was prepared without random access "
                         f"({e}); rebuild it with --file_format=array_record") from e
    except (KeyError, ValueError) as e:
        raise ValueError(f"data.split={split!r} not available for tfds:{name} "
                         f"(splits: {list(builder.info.splits.keys())}): {e}") from e
    return TfdsSource(data_source, builder.info.features, image_size, name)
