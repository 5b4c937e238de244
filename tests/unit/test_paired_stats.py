"""Tests of diffusion_jax.eval.metrics.paired: class-balanced reference statistics, stratified bootstrap intervals of
the Frechet distance, paired differences between sampler cells and their one-line verdicts (numpy only, ~seconds)."""
import math

import numpy as np
import pytest
import scipy.stats

from diffusion_jax.eval.metrics.distances import feature_stats, frechet_distance
from diffusion_jax.eval.metrics.paired import (
    bootstrap_indices,
    fd_interval,
    fd_to_reference,
    mean_interval,
    paired_fd_difference,
    paired_mean_difference,
    verdict_text,
    weighted_stats,
)

F = 4


@pytest.fixture(scope="module")
def ref():
    """A reference Gaussian (mu (F,), sigma (F, F) non-diagonal) and its Cholesky factor."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(F, F))
    sigma = a @ a.T / F + 0.5 * np.eye(F)
    return rng.normal(size=F), sigma, np.linalg.cholesky(sigma)


def _draw(ref, n, seed, shift=0.0):
    """(n, F) samples of N(mu + shift e_0, sigma): FD to the reference is exactly shift^2."""
    mu, _, chol = ref
    offset = np.zeros(F)
    offset[0] = shift
    return mu + offset + np.random.default_rng(seed).normal(size=(n, F)) @ chol.T


def test_weighted_stats_balances_classes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3)) + np.repeat([[0.0, 0, 0], [3.0, 1, 0], [-2.0, 0, 4]], 20, axis=0)
    labels = np.repeat([0, 1, 2], 20)
    mu_bal, s_bal = feature_stats(x)  # balanced: 20 rows per class
    np.testing.assert_allclose(weighted_stats(x, labels)[0], mu_bal, atol=1e-12)
    np.testing.assert_allclose(weighted_stats(x, labels)[1], s_bal, atol=1e-12)
    # Duplicating class 1's rows makes it unbalanced; the weights make the duplicates irrelevant for the mean and
    # the weighted scatter; only the unbiased divisor 1 - sum w^2 changes (it depends on the row count).
    xd, ld = np.concatenate([x, x[labels == 1]]), np.concatenate([labels, labels[labels == 1]])
    mu_w, s_w = weighted_stats(xd, ld)
    np.testing.assert_allclose(mu_w, mu_bal, atol=1e-12)
    w = 1.0 / (3 * np.bincount(ld)[ld])
    np.testing.assert_allclose(s_w * (1 - w @ w), s_bal * (1 - 1 / 60), atol=1e-12)
    assert np.abs(feature_stats(xd)[0] - mu_bal).max() > 0.3  # unweighted stats do feel the imbalance
    # labels None is feature_stats exactly
    for got, want in zip(weighted_stats(xd), feature_stats(xd)):
        np.testing.assert_array_equal(got, want)


def test_bootstrap_indices_keep_strata_and_are_deterministic():
    strata = np.array([5, 5, 5, 2, 2, 9, 5, 2, 7, 7] * 3)
    idx = bootstrap_indices(strata, 50, seed=3)
    assert idx.shape == (50, 30) and idx.dtype.kind == "i"
    np.testing.assert_array_equal(strata[idx], np.broadcast_to(strata, idx.shape))  # same stratum per column
    np.testing.assert_array_equal(idx, bootstrap_indices(strata, 50, seed=3))
    assert not np.array_equal(idx, bootstrap_indices(strata, 50, seed=4))
    assert len(np.unique(idx[:, strata == 5])) == 12  # with replacement, over all rows of the stratum


def test_fd_interval_covers_and_shrinks(ref):
    mu, sigma, _ = ref
    # Drawn from the reference: the true FD is 0 and the estimate is biased up by O(Tr(sigma) / n); the basic
    # interval reflects the resamples' extra bias about the estimate, so it brackets the estimate and stays small.
    null = fd_interval(_draw(ref, 1000, 1), mu, sigma, np.arange(1000) % 10)
    assert null["lo"] < null["fd"] < null["hi"] < 20 * np.trace(sigma) / 1000
    # Shifted by 1 along e_0: the true FD is exactly 1.
    big = fd_interval(_draw(ref, 1000, 2, shift=1.0), mu, sigma, np.arange(1000) % 10, seed=1)
    small = fd_interval(_draw(ref, 250, 3, shift=1.0), mu, sigma, np.arange(250) % 10, seed=1)
    assert big["lo"] <= 1.0 <= big["hi"] and small["lo"] <= 1.0 <= small["hi"]
    assert big["n"] == 1000 and big["half"] == pytest.approx((big["hi"] - big["lo"]) / 2)
    assert big["fd"] == pytest.approx(frechet_distance(*feature_stats(_draw(ref, 1000, 2, 1.0)), mu, sigma))
    assert 1.5 < small["half"] / big["half"] < 3.0  # ~ sqrt(1000 / 250) = 2


def test_paired_fd_difference_identical_cells(ref):
    mu, sigma, _ = ref
    a = _draw(ref, 200, 4, shift=1.0)
    d = paired_fd_difference(a, a.copy(), mu, sigma, np.arange(200) % 10, num_resamples=50)
    assert (d["diff"], d["lo"], d["hi"], d["half"]) == (0.0, 0.0, 0.0, 0.0)
    assert d["verdict"] == "not separable" and d["n_to_separate"] is None


def test_paired_fd_difference_verdicts(ref):
    mu, sigma, _ = ref
    strata = np.arange(500) % 10
    a, b = _draw(ref, 500, 5), _draw(ref, 500, 6, shift=0.5)  # FD(a) ~ 0, FD(b) ~ 0.25
    d = paired_fd_difference(a, b, mu, sigma, strata)
    assert d["verdict"] == "better" and d["hi"] < 0 and d["n_to_separate"] is None
    assert d["diff"] == pytest.approx(fd_to_reference(a, mu, sigma) - fd_to_reference(b, mu, sigma))
    assert d["lo"] < d["diff"] < d["hi"]
    swapped = paired_fd_difference(b, a, mu, sigma, strata)
    assert swapped["verdict"] == "worse" and swapped["diff"] == pytest.approx(-d["diff"])


def test_pairing_narrows_the_interval(ref):
    mu, sigma, _ = ref
    strata = np.arange(500) % 10
    a = _draw(ref, 500, 7, shift=1.0)
    b = a + 0.05 * np.random.default_rng(8).normal(size=a.shape)
    b[:, 0] += 0.05  # b is slightly worse: FD about 1.1 instead of 1.0
    paired = paired_fd_difference(a, b, mu, sigma, strata)
    unpaired = math.hypot(fd_interval(a, mu, sigma, strata, seed=1)["half"],
                          fd_interval(b, mu, sigma, strata, seed=2)["half"])
    assert paired["half"] < 0.25 * unpaired
    assert paired["verdict"] == "better" and abs(paired["diff"]) < unpaired  # separable only when paired


def test_paired_mean_difference_matches_hand_t_interval():
    rng = np.random.default_rng(9)
    a = rng.normal(1.0, 1.0, size=40)
    b = a + rng.normal(0.05, 0.5, size=40)
    d = a - b
    half = scipy.stats.t.ppf(0.975, 39) * d.std(ddof=1) / math.sqrt(40)
    got = paired_mean_difference(a, b)
    assert got["diff"] == pytest.approx(d.mean()) and got["half"] == pytest.approx(half)
    assert got["lo"] == pytest.approx(d.mean() - half) and got["hi"] == pytest.approx(d.mean() + half)
    assert got["n"] == 40
    expected = "better" if got["hi"] < 0 else "worse" if got["lo"] > 0 else "not separable"
    assert got["verdict"] == expected
    if expected == "not separable":
        assert got["n_to_separate"] == math.ceil(40 * (half / abs(d.mean())) ** 2)
    m = mean_interval(a, level=0.9)
    h90 = scipy.stats.t.ppf(0.95, 39) * a.std(ddof=1) / math.sqrt(40)
    assert m["mean"] == pytest.approx(a.mean()) and m["half"] == pytest.approx(h90) and m["n"] == 40
    clear = paired_mean_difference(b + 1.0, b)  # a - b = 1 exactly: zero width, "worse" (larger)
    assert clear["verdict"] == "worse" and clear["half"] == 0.0 and clear["n_to_separate"] is None


def test_not_separable_n_to_separate_and_text():
    d = paired_mean_difference(np.array([0.1, -0.2, 0.3, 0.0, 0.05]), np.zeros(5))
    assert d["verdict"] == "not separable"
    assert d["n_to_separate"] == math.ceil(5 * (d["half"] / abs(d["diff"])) ** 2)
    text = verdict_text(d, "ddpm", "ddim")
    assert text.startswith("ddpm vs ddim: not separable at 95% (+") and "samples would separate them" in text
    fixed = {"diff": -0.21, "lo": -0.30, "hi": -0.12, "half": 0.09, "n": 1000, "verdict": "better",
             "n_to_separate": None}
    assert verdict_text(fixed, "dpmpp_2m", "ddim") == "dpmpp_2m better than ddim: -0.21 [-0.30, -0.12] (n = 1000)"
    worse = dict(fixed, diff=0.21, lo=0.12, hi=0.30, verdict="worse")
    assert verdict_text(worse, "a", "b", unit="FD") == "a worse than b: +0.21 [0.12, 0.30] FD (n = 1000)"
    ns = {"diff": 0.03, "lo": -0.05, "hi": 0.11, "half": 0.08, "n": 1000, "verdict": "not separable",
          "n_to_separate": 7112}
    assert verdict_text(ns, "ddpm", "ddim") == ("ddpm vs ddim: not separable at 95% (+0.03 [-0.05, 0.11], "
                                                "n = 1000; about 7,200 samples would separate them)")
    small = dict(ns, diff=0.041, lo=-0.098, hi=0.181, half=0.139, n=40, n_to_separate=456)
    assert verdict_text(small, "x", "y", "nats") == ("x vs y: not separable at 95% (+0.04 [-0.10, 0.18] nats, "
                                                     "n = 40; about 460 samples would separate them)")
    with pytest.raises(ValueError, match="d must be"):
        verdict_text({"mean": 1.0}, "a", "b")


def test_bad_inputs_name_the_argument(ref):
    mu, sigma, _ = ref
    a = _draw(ref, 20, 10)
    strata = np.arange(20) % 2
    with pytest.raises(ValueError, match="feats_b"):
        paired_fd_difference(a, a[:10], mu, sigma, strata)
    with pytest.raises(ValueError, match="feats"):
        fd_interval(a[:, 0], mu, sigma, strata)
    with pytest.raises(ValueError, match="strata"):
        fd_interval(a, mu, sigma, strata[:19])
    with pytest.raises(ValueError, match="strata"):
        paired_fd_difference(a, a, mu, sigma, strata[:, None])
    with pytest.raises(ValueError, match="ref_sigma"):
        fd_to_reference(a, mu, sigma[:3, :3])
    with pytest.raises(ValueError, match="labels"):
        weighted_stats(a, strata[:5])
    with pytest.raises(ValueError, match="values_b"):
        paired_mean_difference(np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="level"):
        fd_interval(a, mu, sigma, strata, level=95)
    with pytest.raises(ValueError, match="num_resamples"):
        bootstrap_indices(strata, 0, seed=0)


def test_fast_fd_against_a_fixed_reference_equals_sqrtm(ref):
    """The bootstrap's FD (eigvalsh of R S R, R = ref_sigma^1/2) is the sqrtm-based FD up to round-off."""
    from diffusion_jax.eval.metrics.paired import _fd_against

    mu, sigma, _ = ref
    for shift in (0.0, 1.0):
        x = _draw(ref, 300, 7, shift=shift)
        assert _fd_against(mu, sigma)(x) == pytest.approx(fd_to_reference(x, mu, sigma), rel=1e-8, abs=1e-9)
