"""Sample-quality metrics (FD, KID, IS, precision / recall) on any feature extractor.

    from diffusion_jax.eval.metrics import get_classifier, reference_features, evaluate_samples
    ext = get_classifier("digits", 16)                   # small CNN, trained once, then cached
    real = reference_features("digits", 16, ext)         # (N, 128) features of the train split, cached
    scores = evaluate_samples(samples, ext, real)        # samples: (N, 16, 16, 1) float32 in [-1, 1]
    print(scores["fd"], scores["kid"], scores["is"], scores["precision"], scores["recall"])

`distances` holds the maths (numpy / scipy, float64); `classifier` the project's own feature extractor;
`reference` the cached real-data features, `get_extractor` and `evaluate_samples`; `inception` the FID
InceptionV3 (weights from a local file: `load_inception(path)`, imported on demand).
"""
from diffusion_jax.eval.metrics.classifier import FeatureExtractor, SmallCNN, default_cache_dir, get_classifier
from diffusion_jax.eval.metrics.distances import feature_stats, frechet_distance, inception_score, kid, precision_recall
from diffusion_jax.eval.metrics.reference import evaluate_samples, get_extractor, reference_features

__all__ = [
    "FeatureExtractor",
    "SmallCNN",
    "default_cache_dir",
    "evaluate_samples",
    "feature_stats",
    "frechet_distance",
    "get_classifier",
    "get_extractor",
    "inception_score",
    "kid",
    "precision_recall",
    "reference_features",
]
