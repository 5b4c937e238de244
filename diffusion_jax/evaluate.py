"""Evaluate a trained model: generate samples with any sampler, then score them on a feature extractor.

    exp, graphdef, params, step = load_trained(workdir)
    images, labels, nfe = generate(exp, graphdef, params, SamplerSpec("ddim", steps=20), num=1000, seed=0)
    scorer = Scorer.for_experiment(exp)                 # the dataset's classifier + cached real features
    scores = scorer(images, labels)                     # fd, kid, is, precision, recall (+ class_acc)
    floor = scorer.real_floor(1000)                     # the same metrics for 1000 real images: the floor

Common random numbers: image i of seed s always starts from the same x_T (chunk c = i // batch_size draws from
fold_in(PRNGKey(s), c)), so two samplers run with the same (seed, num, batch_size) start from the same noise.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from diffusion_jax.config import build_schedule
from diffusion_jax.sampling import SamplerSpec, make_sample_fn


def generate(exp, graphdef, params, spec: SamplerSpec, *, num: int, seed: int = 0, batch_size: int | None = None,
             labels=None):
    """(images (num, H, W, C) float32 in [-1, 1] (clipped), labels (num,) int32 or None, NFE per image).

    exp: the run's `Experiment`; params: its (EMA) params. For a class-conditional model the labels default to
    `random_labels(num, C, seed)`: iid uniform, so that the samples are an iid draw from the model (balanced labels,
    i % C, would be a stratified sample, which biases KID down and FD down; pass them for a class-ordered grid).
    Chunks of `batch_size` (default: all at once) share one compiled sampler.
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    batch = min(num, batch_size or num)
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    m = exp.model
    if m.num_classes is not None:
        labels = random_labels(num, m.num_classes, seed) if labels is None else np.asarray(labels)
        if labels.shape != (num,) or labels.min() < 0 or labels.max() >= m.num_classes:
            raise ValueError(f"labels must be (num,) = ({num},) ints in [0, {m.num_classes}), got {labels.shape}")
        labels = labels.astype(np.int32)
    elif labels is not None:
        raise ValueError("labels given, but the model is unconditional (model.num_classes is None)")
    schedule = build_schedule(exp.schedule, params)
    shape = (batch, m.image_size, m.image_size, m.in_channels)
    sample = make_sample_fn(graphdef, schedule, spec, shape, prediction=exp.loss.prediction,
                            learn_sigma=m.learn_sigma, num_classes=m.num_classes)
    out, nfe = [], 0
    for c, start in enumerate(range(0, num, batch)):
        y = None
        if labels is not None:   # the last chunk is padded to `batch` (one compile) and cut afterwards
            y = np.resize(labels[start:start + batch], batch)
        x, nfe = sample(params, jax.random.fold_in(jax.random.PRNGKey(seed), c), y)
        out.append(np.asarray(x)[:num - start])
    return np.clip(np.concatenate(out), -1.0, 1.0), labels, nfe


def random_labels(num: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """(num,) int32 labels drawn iid uniformly from [0, num_classes), a function of `seed` only."""
    return np.random.default_rng([seed, num_classes]).integers(0, num_classes, num).astype(np.int32)


@dataclasses.dataclass
class Scorer:
    """Scores samples against a dataset's real features: FD, KID, IS, precision / recall, and, for a
    class-conditional model scored on the dataset's own classifier, class_acc (how often the classifier
    agrees with the requested label)."""
    extractor: object
    real_feats: np.ndarray

    @classmethod
    def for_experiment(cls, exp, *, extractor: str = "classifier", max_items: int = 10000,
                       cache_dir: str | None = None, progress: bool = True) -> "Scorer":
        from diffusion_jax.metrics import get_extractor, reference_features

        d = exp.data
        ext = get_extractor(extractor, d.name, d.image_size, cache_dir=cache_dir, data_dir=d.data_dir,
                            progress=progress)
        real = reference_features(d.name, d.image_size, ext, split=d.split, max_items=max_items,
                                  cache_dir=cache_dir, data_dir=d.data_dir)
        return cls(ext, real)

    def real_floor(self, num: int, seed: int = 0) -> dict[str, float]:
        """fd, kid, precision, recall of `num` real images (an iid subset of the reference set) against the whole
        reference set: what a perfect model would score with this many samples (FD is biased upwards at small N)."""
        from diffusion_jax.metrics import feature_stats, frechet_distance, kid, precision_recall

        real = self.real_feats
        n = min(num, len(real) - 1)
        subset = real[np.random.default_rng([seed, 1]).choice(len(real), n, replace=False)]
        kid_mean, kid_std = kid(subset, real, seed=seed)
        precision, recall = precision_recall(real, subset)
        return {"fd": frechet_distance(*feature_stats(subset), *feature_stats(real)), "kid": kid_mean,
                "kid_std": kid_std, "precision": precision, "recall": recall, "num": n}

    def __call__(self, images, labels=None, *, seed: int = 0) -> dict[str, float]:
        from diffusion_jax.metrics import evaluate_samples

        scores = evaluate_samples(images, self.extractor, self.real_feats, seed=seed)
        if labels is not None and getattr(self.extractor, "test_accuracy", None) is not None:
            probs = np.asarray(self.extractor.probs(images))
            if probs.shape[1] > int(np.max(labels)):
                scores["class_acc"] = float(np.mean(probs.argmax(1) == np.asarray(labels)))
        return scores
