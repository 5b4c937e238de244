"""How well generated images follow an edge map (a ControlNet's condition): per-sample edge IoU and Chamfer
distance between binary edge maps, and a paired interval that resamples whole clusters (one control image drawn with
several seeds is one cluster, not several independent samples).

    iou = edge_iou(control, data.conditions.sobel_edges(samples))        (N,) in [0, 1], higher is better
    cd = chamfer_distance(control, sobel_edges(samples))                 (N,) pixels, lower is better
    d = paired_cluster_difference(iou_with, iou_without, clusters)       {"diff", "lo", "hi", ...}

Edge maps are (N, H, W) or (N, H, W, 1) arrays, nonzero = edge.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from diffusion_jax.eval.metrics.paired import _as_codes, _as_values, _check_level, _difference


def _edges(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, H, W, 1) edge maps, got shape {a.shape}")
    return a > 0.5


def edge_iou(a, b) -> np.ndarray:
    """(N,) |A and B| / |A or B| of two stacks of edge maps; 1 where both are empty."""
    a, b = _edges(a, "a"), _edges(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"edge maps must have one shape, got {a.shape} and {b.shape}")
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def chamfer_distance(a, b) -> np.ndarray:
    """(N,) symmetric Chamfer distance in pixels: (mean over A's edge pixels of the distance to the nearest edge
    pixel of B + the same from B to A) / 2. An empty map against a non-empty one scores the image diagonal (the
    largest possible distance); two empty maps score 0."""
    a, b = _edges(a, "a"), _edges(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"edge maps must have one shape, got {a.shape} and {b.shape}")
    diag = float(np.hypot(*a.shape[1:]))
    out = np.empty(len(a))
    for i, (x, y) in enumerate(zip(a, b)):
        if not x.any() and not y.any():
            out[i] = 0.0
        elif not x.any() or not y.any():
            out[i] = diag
        else:   # distance_transform_edt(~y): each pixel's distance to the nearest edge pixel of y
            out[i] = 0.5 * (ndimage.distance_transform_edt(~y)[x].mean() + ndimage.distance_transform_edt(~x)[y].mean())
    return out


def paired_cluster_difference(values_a, values_b, clusters, *, num_resamples: int = 2000, seed: int = 0,
                              level: float = 0.95) -> dict:
    """Mean of d = a - b over paired samples, with a percentile bootstrap that resamples clusters (e.g. the control
    image each sample was drawn for) with replacement, keeping each cluster's samples together. Keys and verdict
    as `paired.paired_mean_difference` ("better": hi < 0, a smaller); n counts samples, "clusters" clusters."""
    a, b = _as_values(values_a, "values_a"), _as_values(values_b, "values_b")
    if a.shape != b.shape:
        raise ValueError(f"values_b must have the shape of values_a (paired samples), got {a.shape} and {b.shape}")
    level = _check_level(level)
    codes = _as_codes(clusters, len(a), "clusters")
    _, inv = np.unique(codes, return_inverse=True)
    k = int(inv.max()) + 1
    sums, counts = np.bincount(inv, weights=a - b, minlength=k), np.bincount(inv, minlength=k)
    draws = np.random.default_rng(seed).integers(0, k, (num_resamples, k))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    out = _difference(float((a - b).mean()), float(lo), float(hi), len(a), level)
    out["clusters"] = k
    return out


def cluster_mean_interval(values, clusters, *, num_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """{"mean", "lo", "hi", "half"} of values' mean with the cluster bootstrap of `paired_cluster_difference`."""
    v = _as_values(values, "values")
    d = paired_cluster_difference(v, np.zeros_like(v), clusters, num_resamples=num_resamples, seed=seed, level=level)
    return {"mean": d["diff"], "lo": d["lo"], "hi": d["hi"], "half": (d["hi"] - d["lo"]) / 2, "n": d["n"]}
