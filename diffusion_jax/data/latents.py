"""A dataset of VAE latents with a caption per image, as latent diffusion trains on it (built and cached by
`pipelines/latent_data.py`).

get(indices) -> {"image": (B, h, w, c) float32 diffusion latents (the VAE's scaled latents, roughly unit
variance), "label": (B,) int32, "context": (B, L, D) float32 the caption's text-encoder hidden states,
"null_context": (B, L, D) the empty caption's (what classifier-free guidance training drops to,
objectives.discrete.read_batch)}.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffusion_jax.data.pipeline import check_indices


class LatentSource:
    """latents (N, h, w, c) float; labels (N,) int; caption_ids (N,) int into the caption table contexts
    (K, L, D) float; null_context (L, D); captions: the K caption strings; class_names: the labels' names."""

    def __init__(self, latents: np.ndarray, labels: np.ndarray, caption_ids: np.ndarray, contexts: np.ndarray,
                 null_context: np.ndarray, captions: Sequence[str], class_names: Sequence[str]):
        latents, contexts = np.asarray(latents, np.float32), np.asarray(contexts, np.float32)
        if latents.ndim != 4 or not len(latents):
            raise ValueError(f"latents must be (N >= 1, h, w, c), got shape {latents.shape}")
        n = len(latents)
        if np.shape(labels) != (n,) or np.shape(caption_ids) != (n,):
            raise ValueError(f"labels and caption_ids must be ({n},), got {np.shape(labels)}, {np.shape(caption_ids)}")
        if contexts.ndim != 3 or len(contexts) != len(captions):
            raise ValueError(f"contexts must be (K={len(captions)}, L, D), got shape {contexts.shape}")
        if np.shape(null_context) != contexts.shape[1:]:
            raise ValueError(f"null_context must be {contexts.shape[1:]}, got {np.shape(null_context)}")
        caption_ids = np.asarray(caption_ids, np.int64)
        if caption_ids.min() < 0 or caption_ids.max() >= len(contexts):
            raise ValueError(f"caption_ids must index the {len(contexts)} captions")
        if not np.isfinite(latents).all() or not np.isfinite(contexts).all():
            raise ValueError("latents and contexts must be finite")
        self._latents, self._labels = latents, np.asarray(labels, np.int32)
        self._caption_ids, self.contexts = caption_ids, contexts
        self.null_context = np.asarray(null_context, np.float32)
        self.captions, self.class_names = tuple(captions), tuple(class_names)
        self.num_examples = n
        self.image_shape = tuple(int(d) for d in latents.shape[1:])
        self.num_classes = len(self.class_names)
        self.context_shape = tuple(int(d) for d in contexts.shape[1:])

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = check_indices(indices, self.num_examples)
        return {"image": self._latents[idx].copy(), "label": self._labels[idx],
                "context": self.contexts[self._caption_ids[idx]],
                "null_context": np.broadcast_to(self.null_context, (len(idx),) + self.context_shape).copy()}

    def class_captions(self, labels: Sequence[int]) -> list[str]:
        """The first caption template's text for each label (what sample grids are drawn for)."""
        return [self.captions[int(y)] for y in labels]
