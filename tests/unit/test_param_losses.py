"""Parameterization conversions and loss weightings."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.objectives import discrete as losses
from diffusion_jax.objectives import param
from diffusion_jax.objectives import weighting
from diffusion_jax.objectives.discrete import LossConfig, diffusion_loss
from diffusion_jax.process.discrete import make_schedule

KINDS = ("eps", "x0", "v", "score")


@pytest.fixture(scope="module")
def sample():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = jax.random.normal(k1, (6, 4, 4, 2))
    eps = jax.random.normal(k2, x0.shape)
    abar = jax.random.uniform(k3, (6, 1, 1, 1), minval=0.05, maxval=0.95)
    alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    return x0, eps, alpha * x0 + sigma * eps, alpha, sigma


@pytest.mark.parametrize("source", KINDS)
@pytest.mark.parametrize("target", KINDS)
def test_conversions_round_trip(sample, source, target):
    x0, eps, xt, alpha, sigma = sample
    pred = param.from_x0_eps(source, x0, eps, alpha, sigma)
    converted = param.convert(pred, source, target, xt, alpha, sigma)
    np.testing.assert_allclose(converted, param.from_x0_eps(target, x0, eps, alpha, sigma), rtol=1e-4, atol=1e-4)
    back = param.convert(converted, target, source, xt, alpha, sigma)
    np.testing.assert_allclose(back, pred, rtol=1e-4, atol=1e-4)


def test_v_definition(sample):
    x0, eps, xt, alpha, sigma = sample
    v = param.v_from_x0_eps(x0, eps, alpha, sigma)
    # Salimans & Ho 2022: v = alpha eps - sigma x0, and x0 = alpha x_t - sigma v.
    np.testing.assert_allclose(alpha * xt - sigma * v, x0, atol=1e-5)


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "score"])
def test_mse_factor_is_exact(sample, kind):
    """||target - pred||^2 = c_k(SNR) ||x0 - x0_hat||^2 for a perturbed prediction at fixed x_t."""
    x0, eps, xt, alpha, sigma = sample
    x0_hat = x0 + 0.1 * jax.random.normal(jax.random.PRNGKey(5), x0.shape)
    eps_hat = param.eps_from_x0(xt, x0_hat, alpha, sigma)
    err_k = losses.mean_flat((param.from_x0_eps(kind, x0, eps, alpha, sigma)
                              - param.from_x0_eps(kind, x0_hat, eps_hat, alpha, sigma)) ** 2)
    err_x0 = losses.mean_flat((x0 - x0_hat) ** 2)
    snr = (alpha / sigma) ** 2
    np.testing.assert_allclose(err_k, param.mse_to_x0_mse_factor(kind, snr.reshape(-1)) * err_x0, rtol=1e-3)


def test_min_snr_weights_match_hang_et_al():
    snr = jnp.array([0.1, 1.0, 5.0, 20.0])
    log_snr = jnp.log(snr)
    # Paper, Sec. 3.4: eps-prediction weight min(SNR, gamma) / SNR; v-prediction min(SNR, gamma) / (SNR + 1).
    np.testing.assert_allclose(weighting.target_weight("min_snr", "eps", log_snr, gamma=5.0), jnp.minimum(snr, 5) / snr,
                               rtol=1e-6)
    np.testing.assert_allclose(weighting.target_weight("min_snr", "v", log_snr, gamma=5.0),
                               jnp.minimum(snr, 5) / (snr + 1), rtol=1e-6)
    np.testing.assert_allclose(weighting.target_weight("snr", "eps", log_snr), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weighting.target_weight("simple", "v", log_snr), 1.0)
    np.testing.assert_allclose(weighting.target_weight("const", "x0", log_snr), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["simple", "const", "snr", "max_snr", "min_snr", "v"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_one_weighting_vocabulary_for_every_target(name, prediction):
    """w(lambda) on the eps error is what the weighting names: the weighted MSE of any target equals w times the eps
    MSE of the same error (Kingma & Gao 2023). Checked on a random x0 error at fixed x_t, with the target's error
    computed from x0_hat, not from c_k."""
    rng = np.random.default_rng(0)
    alpha = np.array([0.995, 0.9, 0.6, 0.2, 0.05], np.float32)
    sigma = np.sqrt(1 - alpha ** 2)
    shape = (5, 4, 4, 1)
    x0, eps = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    xt = a * x0 + s * eps
    x0_hat = x0 + 0.1 * rng.standard_normal(shape, np.float32)
    eps_hat = param.eps_from_x0(xt, x0_hat, a, s)
    target = lambda x0_, eps_: param.from_x0_eps(prediction, x0_, eps_, a, s)
    mse_target = losses.mean_flat((target(x0, eps) - target(x0_hat, eps_hat)) ** 2)
    mse_eps = losses.mean_flat((eps - eps_hat) ** 2)
    log_snr = jnp.log(alpha ** 2 / sigma ** 2)
    w_target = weighting.target_weight(name, prediction, log_snr, gamma=5.0)
    w_eps = weighting.eps_weight(name, log_snr, prediction=prediction, gamma=5.0)
    np.testing.assert_allclose(w_target * mse_target, w_eps * mse_eps, rtol=2e-3)


def test_likelihood_weighting_needs_continuous_time():
    with pytest.raises(ValueError, match="continuous-time process"):
        LossConfig(weighting="likelihood").validate(learn_sigma=False)
    with pytest.raises(ValueError, match="continuous-time process"):
        weighting.eps_weight("likelihood", jnp.zeros(3))
    with pytest.raises(ValueError, match="loss.weighting='sigma2' is unknown"):
        weighting.check_weighting("sigma2", continuous=True)


def test_normal_kl_and_decoder_likelihood():
    assert float(losses.normal_kl(0.3, -1.0, 0.3, -1.0)) == pytest.approx(0.0, abs=1e-7)
    # KL(N(0,1) || N(1, e^2)) = log(e) + (1 + 1) / (2 e^2) - 1/2
    kl = float(losses.normal_kl(0.0, 0.0, 1.0, 2.0))
    assert kl == pytest.approx(1.0 + 2.0 / (2 * math.e ** 2) - 0.5, rel=1e-6)
    # A sharp decoder centred on a bin gives probability ~1; the 256 bin probabilities sum to 1.
    assert float(losses.discretized_gaussian_log_likelihood(jnp.array(0.0), 0.0, -8.0)) == pytest.approx(0.0, abs=1e-5)
    bins = jnp.linspace(-1, 1, 256)
    total = jnp.sum(jnp.exp(losses.discretized_gaussian_log_likelihood(bins, 0.1, jnp.log(0.3))))
    assert float(total) == pytest.approx(1.0, abs=1e-4)


def _toy_apply(params, xt, t, y=None, train=False, dropout_key=None):
    # A tiny "network": per-channel linear map of x_t, enough to differentiate through.
    return xt @ params["w"] + params["b"]


@pytest.mark.parametrize("loss_type", ["mse", "hybrid", "vlb"])
def test_diffusion_loss_runs_and_hybrid_freezes_the_mean(loss_type):
    s = make_schedule("linear", 1000)
    c = 2
    learn_sigma = loss_type == "hybrid"
    out_c = 2 * c if learn_sigma else c
    params = {"w": 0.1 * jnp.ones((c, out_c)), "b": jnp.zeros((out_c,))}
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(1), (8, 4, 4, c), minval=-1, maxval=1)}
    cfg = LossConfig(loss_type=loss_type)
    cfg.validate(learn_sigma)
    loss_fn = lambda p: diffusion_loss(_toy_apply, s, cfg, p, batch, jax.random.PRNGKey(2), learn_sigma=learn_sigma)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    assert np.isfinite(float(loss)) and float(loss) > 0
    if loss_type == "hybrid":
        # Gradient of the VLB part w.r.t. the mean channels is blocked: the mean-channel gradient
        # equals the gradient of the MSE alone.
        mse_only = LossConfig(loss_type="mse")
        g_mse = jax.grad(lambda p: diffusion_loss(_toy_apply, s, mse_only, p, batch, jax.random.PRNGKey(2),
                                                  learn_sigma=True)[0])(params)
        np.testing.assert_allclose(grads["w"][:, :c], g_mse["w"][:, :c], rtol=1e-5, atol=1e-7)
        assert float(jnp.abs(grads["w"][:, c:]).sum()) > 0


def test_loss_config_errors_name_the_key():
    with pytest.raises(ValueError, match="loss.weighting"):
        LossConfig(weighting="snr2").validate(False)
    with pytest.raises(ValueError, match="model.learn_sigma"):
        LossConfig(loss_type="hybrid").validate(False)
    with pytest.raises(ValueError, match="loss.prediction"):
        LossConfig(prediction="score").validate(False)
