"""Image data: sources (float32 NHWC in [-1, 1]) and deterministic, resumable batches.

    source = load_source(DataConfig(name="fashion_mnist", image_size=32))
    batches = Batches(source, batch_size=128, seed=0, random_flip=False)
    for batch in batches.iterate(start_step=step):   # {"image": (B,32,32,1) float32, "label": (B,) int32}
        ...

TFDS support lives in `diffusion_jax.data.tfds_source` and imports tensorflow_datasets only when used.
"""
from diffusion_jax.data.images import center_crop_resize
from diffusion_jax.data.pipeline import Batches, DataConfig, Source
from diffusion_jax.data.sources import (
    ArraySource,
    load_digits,
    load_fashion_mnist,
    load_folder,
    load_source,
    read_idx,
    resize_images,
)
from diffusion_jax.data.tfds_source import TfdsSource, load_tfds

__all__ = [
    "ArraySource",
    "Batches",
    "DataConfig",
    "Source",
    "TfdsSource",
    "center_crop_resize",
    "load_digits",
    "load_fashion_mnist",
    "load_folder",
    "load_source",
    "load_tfds",
    "read_idx",
    "resize_images",
]
