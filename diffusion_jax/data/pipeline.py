"""Typed data config, the `Source` protocol and deterministic, resumable batching.

Every source yields float32 NHWC images in [-1, 1] (and int32 labels when labelled). `Batches` turns a
source into an infinite stream of fixed-size batches whose content depends only on
``(seed, step, batch_size, num_examples)``, so a run restarted from a checkpoint at step ``k`` sees exactly
the batches it would have seen (``iterate(start_step=k)``), with no iterator state to save.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

BUILTIN_NAMES = ("digits", "fashion_mnist", "folder", "pairs")
_NAME_CHOICES = "'digits', 'fashion_mnist', 'folder', 'pairs', 'tfds:<dataset_name>' (e.g. 'tfds:mnist')"
_FLIP_TAG = 0xF11  # mixed into the flip seed so flips never share a stream with epoch permutations


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images to load and how (the typed form of ``config.data``).

    name: "digits" | "fashion_mnist" | "folder" | "pairs" | "tfds:<dataset_name>" (e.g. "tfds:mnist", "tfds:cifar10");
      "pairs" is a reflow coupling of noise and samples (`data/pairs.py`).
    image_size: output height = width in pixels (every source resizes to it).
    data_dir: image folder ("folder"), IDX directory ("fashion_mnist"), the .npz pair file ("pairs"), TFDS data_dir
      ("tfds:*");
      None -> the source's default location ("folder" requires it).
    split: "train" | "test" for digits / fashion_mnist; "train" (all images) for folder; any TFDS split
      string (e.g. "train[:90%]") for tfds.
    random_flip: horizontal flips in `Batches` (deterministic given seed and step).
    seed: seeds the epoch permutations and flips.
    grayscale: "folder" only: read the images as one grey channel (PIL mode "L") instead of RGB.
    """

    name: str = "digits"
    image_size: int = 16
    data_dir: str | os.PathLike | None = None
    split: str = "train"
    random_flip: bool = False
    seed: int = 0
    grayscale: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the offending ``data.<key>`` if the config is inconsistent."""
        name = self.name
        if not isinstance(name, str) or not (
            name in BUILTIN_NAMES or (name.startswith("tfds:") and len(name) > len("tfds:"))
        ):
            raise ValueError(f"data.name={name!r} unknown; choose from {_NAME_CHOICES}")
        if not _is_int(self.image_size) or self.image_size <= 0:
            raise ValueError(f"data.image_size must be a positive int, got {self.image_size!r}")
        if self.data_dir is not None and not (
            isinstance(self.data_dir, (str, os.PathLike)) and os.fspath(self.data_dir)
        ):
            raise ValueError(f"data.data_dir must be None or a non-empty path, got {self.data_dir!r}")
        if name == "folder" and self.data_dir is None:
            raise ValueError("data.data_dir must be set to an image folder when data.name='folder'")
        if name == "pairs" and self.data_dir is None:
            raise ValueError("data.data_dir must be set to a pair file (`diffusion-jax reflow --out PAIRS.npz`) when "
                             "data.name='pairs'")
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"data.split must be a non-empty str, got {self.split!r}")
        allowed = {"digits": ("train", "test"), "fashion_mnist": ("train", "test"), "folder": ("train",),
                   "pairs": ("train",)}
        if name in allowed and self.split not in allowed[name]:
            raise ValueError(
                f"data.split={self.split!r} invalid for data.name={name!r}; choose from {allowed[name]}"
            )
        if not isinstance(self.random_flip, (bool, np.bool_)):
            raise ValueError(f"data.random_flip must be a bool, got {self.random_flip!r}")
        if self.random_flip and name == "pairs":
            raise ValueError("data.random_flip=True would mirror a pair's image but not its noise, which breaks the "
                             "coupling reflow trains on: set data.random_flip=False for data.name='pairs'")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"data.seed must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.grayscale, (bool, np.bool_)):
            raise ValueError(f"data.grayscale must be a bool, got {self.grayscale!r}")
        if self.grayscale and name != "folder":
            raise ValueError(f"data.grayscale=True reads a folder's images as one channel; data.name={name!r} is "
                             "not 'folder' (digits and fashion_mnist are grey already)")


def check_indices(indices, num_examples: int) -> np.ndarray:
    """indices as a 1-D integer array in [0, num_examples); IndexError naming the problem otherwise."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise IndexError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_examples):
        raise IndexError(f"indices out of range [0, {num_examples}): {idx.min()}..{idx.max()}")
    return idx


@runtime_checkable
class Source(Protocol):
    """Random-access image source.

    num_examples: N. image_shape: (H, W, C). num_classes: None when unlabelled.
    get(indices (B,) int) -> {"image": (B, H, W, C) float32 in [-1, 1], "label": (B,) int32 (if labelled)}.
    """

    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int | None

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class Batches:
    """Deterministic, resumable batches: ``batch_at(step)`` depends only on (seed, step, batch_size, N).

    Epoch e uses the permutation ``np.random.default_rng([seed, e]).permutation(N)``; the last
    ``N % batch_size`` examples of each epoch's permutation are dropped; step s belongs to epoch
    ``s // steps_per_epoch``. With ``random_flip`` each example of step s is mirrored left-right with
    probability 1/2, drawn from ``np.random.default_rng([seed, s, 0xF11])``.
    Batches are dicts {"image": (B, H, W, C) float32 in [-1, 1], "label": (B,) int32 if labelled}.
    """

    def __init__(self, source: Source, batch_size: int, *, seed: int = 0, random_flip: bool = False):
        n = int(source.num_examples)
        if not _is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"train.batch_size must be a positive int, got {batch_size!r}")
        if batch_size > n:
            raise ValueError(
                f"train.batch_size={batch_size} is larger than the dataset ({n} examples); "
                "lower train.batch_size or use a larger data split"
            )
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"data.seed must be a non-negative int, got {seed!r}")
        self.source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.random_flip = bool(random_flip)
        self.num_examples = n
        self.steps_per_epoch = n // self.batch_size
        self._perm_cache: tuple[int, np.ndarray] | None = None  # (epoch, perm); swapped atomically

    def permutation(self, epoch: int) -> np.ndarray:
        """(N,) int64 order of the examples in ``epoch`` (the last one is cached)."""
        cached = self._perm_cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        self._perm_cache = (epoch, perm)
        return perm

    def indices_at(self, step: int) -> np.ndarray:
        """(batch_size,) int64 example indices of ``step``."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        epoch, i = divmod(int(step), self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """The batch of ``step``: {"image": (B,H,W,C) float32 in [-1, 1], "label": (B,) int32 if labelled}."""
        batch = dict(self.source.get(self.indices_at(step)))
        if self.random_flip:
            flip = np.random.default_rng([self.seed, int(step), _FLIP_TAG]).random(self.batch_size) < 0.5
            for name in ("image", "control"):   # a ControlNet's control image is mirrored with its image
                if name in batch:
                    image = np.array(batch[name], copy=True)
                    image[flip] = image[flip, :, ::-1, :]
                    batch[name] = image
        return batch

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Infinite ``batch_at(start_step), batch_at(start_step + 1), ...``.

        One background thread prepares the next batch while the caller (e.g. the device) works on the
        current one. Closing the generator (or dropping it) stops the thread after its pending batch.
        """
        if not _is_int(start_step) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
        return self._iterate(int(start_step))

    def _iterate(self, step: int) -> Iterator[dict[str, np.ndarray]]:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="diffusion_jax-prefetch") as ex:
            pending = ex.submit(self.batch_at, step)
            while True:
                batch = pending.result()
                step += 1
                pending = ex.submit(self.batch_at, step)
                yield batch
