"""Tests of diffusion_jax.eval.metrics: the distances against closed forms / independent computations, the
project's digits classifier (trained once per module into a temporary cache) and `evaluate_samples`."""
import os
import time

import numpy as np
import pytest
import scipy.spatial

from diffusion_jax.eval.metrics import classifier as classifier_mod
from diffusion_jax.eval.metrics import distances as distances_mod
from diffusion_jax.eval.metrics import (
    evaluate_samples,
    feature_stats,
    frechet_distance,
    get_classifier,
    inception_score,
    kid,
    precision_recall,
    reference_features,
)


def _correlated(rng, n, f):
    """(n, f) features with a random non-diagonal covariance and non-zero mean."""
    return rng.normal(size=(n, f)) @ rng.normal(size=(f, f)) + rng.normal(size=f)


def _trace_sqrt_eig(s1, s2):
    """Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})), via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()


def test_frechet_self_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    x = _correlated(rng, 2000, 16)
    mu, sigma = feature_stats(x)
    assert mu.shape == (16,) and sigma.shape == (16, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    fds = [frechet_distance(mu, sigma, *feature_stats(x + s * rng.normal(size=x.shape))) for s in (0.1, 0.3, 1, 3)]
    assert np.all(np.diff(fds) > 0), fds
    assert fds[0] > 0


def test_frechet_matches_eigendecomposition_and_closed_form():
    rng = np.random.default_rng(1)
    mu1, s1 = feature_stats(_correlated(rng, 500, 20))
    mu2, s2 = feature_stats(_correlated(rng, 500, 20))
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_eig(s1, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    # N(m1, diag(a)) vs N(m2, diag(b)): ||m1 - m2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a, b = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
    m1, m2 = rng.normal(size=10), rng.normal(size=10)
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(closed, rel=1e-10)


def test_frechet_singular_covariance_and_shape_errors():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))  # N < F: rank-deficient covariances
    fd = frechet_distance(*feature_stats(x), *feature_stats(y))
    assert np.isfinite(fd) and fd > 0
    with pytest.raises(ValueError, match=r"\(4,\).*\(5, 5\)"):
        frechet_distance(np.zeros(4), np.eye(5), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="shape"):
        feature_stats(np.zeros(5))


def test_kid_is_unbiased_and_detects_a_shift():
    rng = np.random.default_rng(3)
    vals = np.array([kid(rng.normal(size=(50, 8)), rng.normal(size=(50, 8)), subset_size=50, num_subsets=1,
                         seed=i)[0] for i in range(300)])
    se = vals.std() / np.sqrt(len(vals))
    assert abs(vals.mean()) < 4 * se, (vals.mean(), se)
    assert (vals < 0).any()  # unbiased, so not clipped at zero
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 0.5
    mean, std = kid(a, b, subset_size=100, num_subsets=20)
    assert mean > 10 * se and mean > 3 * std / np.sqrt(20)
    assert kid(a, a[:30], subset_size=1000, num_subsets=2)[0] == pytest.approx(kid(a, a[:30], 30, 2)[0])


def test_inception_score_bounds():
    c, splits = 7, 5
    uniform = np.full((c * splits * 3, c), 1 / c)
    assert inception_score(uniform, splits)[0] == pytest.approx(1.0)
    onehot = np.tile(np.eye(c), (splits * 3, 1))  # each contiguous split holds every class equally often
    mean, std = inception_score(onehot, splits)
    assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_extremes_and_blocking(monkeypatch):
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 8))
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, rng.normal(size=(200, 8)) + 100.0, k=3) == (0.0, 0.0)
    # Fake covers only one of two real clusters: precision ~1, recall ~1/2.
    two = np.concatenate([rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 20])
    p, r = precision_recall(two, rng.normal(size=(200, 8)), k=3)
    assert p > 0.9 and 0.4 < r < 0.55
    # Blocked computation == brute force with scipy's cdist.
    fake = rng.normal(size=(150, 8)) * 1.3 + 0.3
    monkeypatch.setattr(distances_mod, "_PAIRWISE_BATCH", 7)
    got = precision_recall(real, fake, k=3)
    rad = lambda x: np.sort(scipy.spatial.distance.cdist(x, x), axis=1)[:, 3]
    d = scipy.spatial.distance.cdist(fake, real)
    want = ((d <= rad(real)[None]).any(1).mean(), (d.T <= rad(fake)[None]).any(1).mean())
    assert got == pytest.approx(want)


@pytest.fixture(scope="module")
def digits_clf(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("metrics_cache"))
    t0 = time.perf_counter()
    ext = get_classifier("digits", 16, cache_dir=cache, progress=False)
    return ext, cache, time.perf_counter() - t0


def test_digits_classifier_accuracy_and_cache(digits_clf, monkeypatch):
    """Measured: 0.9889 test accuracy on the 180 held-out digits (300 Adam steps of 64, ~15 s on 2 CPU cores)."""
    ext, cache, _ = digits_clf
    assert ext.name == "classifier-digits-16" and ext.num_classes == 10
    assert ext.test_accuracy >= 0.95, ext.test_accuracy
    folder = os.path.join(cache, "classifiers", "digits-16")
    assert sorted(f for f in os.listdir(folder) if not f.startswith(".")) == ["info.json", "params.npz"]

    def no_training(*args, **kwargs):
        raise AssertionError("get_classifier retrained although the cache was valid")

    monkeypatch.setattr(classifier_mod, "train_classifier", no_training)
    again = get_classifier("digits", 16, cache_dir=cache, progress=False)
    assert again.test_accuracy == ext.test_accuracy
    x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 1)).astype(np.float32)
    np.testing.assert_array_equal(again.features(x), ext.features(x))
    # A truncated params file counts as no cache (would retrain, here: raise).
    with open(os.path.join(folder, "params.npz"), "rb") as f:
        blob = f.read()
    bad = os.path.join(str(cache), "bad")
    os.makedirs(os.path.join(bad, "classifiers", "digits-16"))
    with open(os.path.join(bad, "classifiers", "digits-16", "params.npz"), "wb") as f:
        f.write(blob[: len(blob) // 2])
    with open(os.path.join(folder, "info.json")) as src, \
            open(os.path.join(bad, "classifiers", "digits-16", "info.json"), "w") as dst:
        dst.write(src.read())
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(AssertionError, match="retrained"):
        get_classifier("digits", 16, cache_dir=bad, progress=False)


def test_classifier_features_probs_and_errors(digits_clf):
    ext = digits_clf[0]
    x = np.random.default_rng(0).uniform(-1, 1, (700, 16, 16, 1)).astype(np.float32)  # > one batch of 500
    feats, probs = ext.features(x), ext.probs(x)
    assert feats.shape == (700, ext.feature_dim) == (700, 128) and feats.dtype == np.float64
    assert probs.shape == (700, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(ext.features(x[:5]), feats[:5], rtol=1e-5, atol=1e-5)  # padding is harmless
    with pytest.raises(ValueError, match=r"\(N, 16, 16, 1\)"):
        ext.features(np.zeros((2, 32, 32, 1), np.float32))
    with pytest.raises(ValueError, match="digits.*fashion_mnist"):
        get_classifier("cifar10", 32, cache_dir=digits_clf[1], progress=False)


def test_evaluate_samples_real_beats_noise(digits_clf):
    from diffusion_jax.data import load_digits

    ext, cache, _ = digits_clf
    real = reference_features("digits", 16, ext, cache_dir=cache)
    assert real.shape == (1617, 128)
    np.testing.assert_array_equal(reference_features("digits", 16, ext, cache_dir=cache), real)  # from the cache
    assert len(os.listdir(os.path.join(cache, "reference"))) == 1
    test = load_digits("test", 16)
    held_out = test.get(np.arange(test.num_examples))["image"]
    noise = np.random.default_rng(0).uniform(-1, 1, held_out.shape).astype(np.float32)
    good = evaluate_samples(held_out, ext, real, kid_subsets=20)
    bad = evaluate_samples(noise, ext, real, kid_subsets=20)
    assert set(good) == {"fd", "kid", "kid_std", "is", "is_std", "precision", "recall"}
    assert all(isinstance(v, float) for v in good.values())
    assert good["fd"] < bad["fd"] / 10 and good["kid"] < bad["kid"] / 10
    assert good["is"] > 5 > bad["is"]  # 10 classes, confidently and evenly predicted on real digits
    assert good["precision"] > 0.8 and bad["precision"] < 0.2


@pytest.mark.slow
def test_fashion_mnist_classifier(tmp_path):
    """Measured: 0.8909 test accuracy (2,400 Adam steps of 64, 122 s of training on 2 shared CPU cores)."""
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    ext = get_classifier("fashion_mnist", 32, cache_dir=str(tmp_path), progress=False)
    assert ext.test_accuracy >= 0.88, ext.test_accuracy
    assert ext.features(np.zeros((2, 32, 32, 1), np.float32)).shape == (2, 128)
