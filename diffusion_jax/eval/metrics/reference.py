"""Reference features of real data (cached) and the full metric suite for a batch of generated samples.

An *extractor* is any object with ``.name`` (str), ``.features(images) -> (N, F)`` and, optionally,
``.probs(images) -> (N, C)`` (needed for the Inception Score; without it IS is NaN), taking float32 NHWC
images in [-1, 1] (e.g. `classifier.FeatureExtractor`).
"""
from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from diffusion_jax.data import DataConfig, load_source
from diffusion_jax.eval.metrics.classifier import SUPPORTED, FeatureExtractor, default_cache_dir, get_classifier
from diffusion_jax.eval.metrics.distances import (
    _as_feats,
    feature_stats,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)
from diffusion_jax.fileio import atomic_write
from diffusion_jax.validate import check_images

_BATCH = 1000  # images loaded and featurized at a time


def _safe(s) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(s))


def reference_features(dataset: str, image_size: int, extractor, *, split: str = "train", max_items: int = 10000,
                       cache_dir: str | None = None, data_dir=None, return_labels: bool = False):
    """Features (min(N, max_items), F) float64 of `dataset`'s `split` at `image_size` pixels.

    dataset: any `DataConfig.name` ("digits", "fashion_mnist", "folder", "tfds:..."). When the split has more
    than `max_items` images, a fixed subset is used (``np.random.default_rng(0).choice``, kept in order).
    Cached as ``{cache_dir}/reference/{dataset}-{image_size}-{extractor.name}-{split}-{max_items}.npz``
    (written to a temporary name, then os.replace'd); a later call with the same key loads it.
    return_labels: also return the images' class labels (M,) int32 (-1 where the source has none).
    """
    if not isinstance(max_items, (int, np.integer)) or max_items < 2:
        raise ValueError(f"max_items must be an int >= 2, got {max_items!r}")
    folder = os.path.join(cache_dir or default_cache_dir(), "reference")
    key = "-".join(_safe(p) for p in (dataset, image_size, extractor.name, split, max_items))
    path = os.path.join(folder, key + ".npz")
    try:
        with np.load(path) as z:
            feats, labels = z["features"], z["labels"]
        return (feats, labels) if return_labels else feats
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        pass  # absent, unreadable or from before labels were kept: recompute
    source = load_source(DataConfig(name=dataset, image_size=int(image_size), data_dir=data_dir, split=split))
    n = source.num_examples
    idx = np.arange(n) if n <= max_items else np.sort(np.random.default_rng(0).choice(n, max_items, replace=False))
    feats, labels = [], []
    for i in range(0, len(idx), _BATCH):
        batch = source.get(idx[i:i + _BATCH])
        feats.append(extractor.features(batch["image"]))
        labels.append(np.asarray(batch.get("label", np.full(len(batch["image"]), -1)), np.int32))
    feats, labels = np.concatenate(feats).astype(np.float64), np.concatenate(labels)
    atomic_write(path, lambda f: np.savez(f, features=feats, labels=labels))
    return (feats, labels) if return_labels else feats


def check_extractor(kind: str, dataset: str) -> None:
    """ValueError unless `kind` names an extractor that can score `dataset` (checked before anything is trained)."""
    if kind != "classifier" and kind != "inception" and not kind.startswith("inception:"):
        raise ValueError(f"metrics.extractor={kind!r} is unknown; choose 'classifier' or 'inception[:PATH]'")
    if kind == "classifier" and dataset not in SUPPORTED:
        raise ValueError(f"the classifier extractor supports data {SUPPORTED}, not data.name={dataset!r}; "
                         "use --extractor inception:PATH")


def get_extractor(kind: str, dataset: str, image_size: int, *, cache_dir: str | None = None, data_dir=None,
                  progress: bool = True):
    """The feature extractor named by `kind`: "classifier" (the project's CNN for `dataset`, trained once and
    cached; the offline default) or "inception" / "inception:PATH" (the FID InceptionV3 from a local weights
    file; see `metrics.inception`)."""
    check_extractor(kind, dataset)
    if kind == "classifier":
        return get_classifier(dataset, image_size, cache_dir=cache_dir, progress=progress, data_dir=data_dir)
    from diffusion_jax.eval.metrics.inception import load_inception

    return load_inception(kind.partition(":")[2] or None)


def evaluate_samples(images, extractor, real_feats, *, kid_subsets: int = 100, pr_k: int = 3,
                     seed: int = 0, real_stats=None) -> dict[str, float]:
    """All metrics of generated `images` (N, H, W, C) float32 in [-1, 1] against `real_feats` (M, F).

    Returns {"fd": Frechet distance, "kid", "kid_std": KID mean / std over `kid_subsets` subsets of
    min(1000, N, M) rows, "is", "is_std": Inception Score over 10 splits (NaN if the extractor has no
    `probs`), "precision", "recall": k-NN manifolds with k = pr_k}. FD and KID are in squared feature units.
    real_stats: (mu, sigma) to use for FD instead of `real_feats`' own (e.g. class-balanced, `paired.weighted_stats`).
    """
    images = check_images(images, "images", min_count=2)  # KID and precision / recall need 2 rows
    fake, probs = features_and_probs(extractor, images)
    return score_features(fake, probs, real_feats, kid_subsets=kid_subsets, pr_k=pr_k, seed=seed,
                          real_stats=real_stats, name=extractor.name)


def features_and_probs(extractor, images) -> tuple[np.ndarray, np.ndarray | None]:
    """(features (N, F) float64, class probabilities (N, C) or None when the extractor has no `probs`)."""
    if isinstance(extractor, FeatureExtractor):  # one pass for features and class probabilities
        fake, logits = extractor.features_and_logits(images)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        return fake, probs / probs.sum(1, keepdims=True)
    fake = np.asarray(extractor.features(images), np.float64)
    probs = np.asarray(extractor.probs(images), np.float64) if callable(getattr(extractor, "probs", None)) else None
    return fake, probs


def score_features(fake, probs, real_feats, *, kid_subsets: int = 100, pr_k: int = 3, seed: int = 0,
                   real_stats=None, name: str = "the extractor") -> dict[str, float]:
    """`evaluate_samples` on features already extracted: fake (N, F), probs (N, C) or None."""
    fake = _as_feats(fake, "fake features")
    real = _as_feats(real_feats, "real_feats")
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"real_feats must be (M, {fake.shape[1]}) to match {name}, got {real.shape}")
    kid_mean, kid_std = kid(fake, real, num_subsets=kid_subsets, seed=seed)
    is_mean, is_std = inception_score(probs, splits=min(10, len(probs))) if probs is not None else (np.nan, np.nan)
    precision, recall = precision_recall(real, fake, k=pr_k)
    mu_sigma = feature_stats(real) if real_stats is None else real_stats
    return {"fd": frechet_distance(*feature_stats(fake), *mu_sigma), "kid": kid_mean, "kid_std": kid_std,
            "is": float(is_mean), "is_std": float(is_std), "precision": precision, "recall": recall}
