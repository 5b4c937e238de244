"""Schedules against their published definitions, and the forward process against its closed form."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.process import discrete as schedules
from diffusion_jax.process.discrete import ContinuousSchedule, make_schedule, q_posterior, q_sample


def test_linear_alpha_bar_matches_ho_et_al_values():
    # Independent computation of Ho et al.'s schedule (betas linspace(1e-4, 0.02, 1000)) with a python loop.
    abar, prod = [], 1.0
    for i in range(1000):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / 999)
        abar.append(prod)
    s = make_schedule("linear", 1000)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), abar, rtol=2e-5, atol=1e-9)
    # Known landmarks: abar_T ~ 4.0e-5 (SNR_T ~ 4e-5), abar_0 = 1 - 1e-4.
    assert abs(float(s.alphas_cumprod[-1]) - 4.036e-5) < 1e-7
    assert float(s.alphas_cumprod[0]) == pytest.approx(1 - 1e-4)


def test_cosine_schedule_matches_improved_ddpm_formula():
    T, s_ = 1000, 0.008
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2
    expected = [min(f(i) / f(0), 1.0) for i in range(1, T + 1)]
    got = np.asarray(make_schedule("cosine", T).alphas_cumprod)
    # beta is clipped at 0.999 near t = T, which only changes the last few steps.
    np.testing.assert_allclose(got[:-20], expected[:-20], rtol=1e-4, atol=1e-7)


@pytest.mark.torch
@pytest.mark.parametrize("name,diffusers_name", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                                  ("cosine", "squaredcos_cap_v2"), ("sigmoid", "sigmoid")])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_match_diffusers(name, diffusers_name, zero_snr):
    diffusers = pytest.importorskip("diffusers")
    kw = {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}.get(name, {})
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name,
                                  rescale_betas_zero_snr=zero_snr, **kw)
    ours = make_schedule(name, 1000, zero_terminal_snr=zero_snr, **kw)
    # diffusers rescales in float32 torch (cumprod, then ratios), we in float64: ~1e-6 absolute noise.
    atol = 2e-6 if zero_snr else 1e-7
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=1e-5, atol=atol)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-4, atol=1e-7)


def test_zero_terminal_snr():
    s = make_schedule("scaled_linear", 1000, zero_terminal_snr=True)
    assert float(s.alphas_cumprod[-1]) == 0.0
    assert float(s.snr(999)) == 0.0
    # sqrt(abar_1) is kept (Lin et al. 2024, Alg. 1).
    base = make_schedule("scaled_linear", 1000)
    assert float(s.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-6)
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


def test_snr_sigma_identities():
    s = make_schedule("cosine", 1000)
    t = jnp.arange(0, 1000, 37)
    np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, atol=1e-6)
    np.testing.assert_allclose(s.log_snr(t), jnp.log(s.snr(t)), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(np.asarray(s.log_snr(t))) < 0)


def test_q_sample_moments_match_closed_form():
    s = make_schedule("linear", 1000)
    n, x0_value = 200_000, 0.7
    for t in (0, 100, 500, 999):
        noise = jax.random.normal(jax.random.PRNGKey(t), (n, 1))
        x0 = jnp.full((n, 1), x0_value)
        xt = np.asarray(q_sample(s, x0, jnp.full((n,), t), noise))
        abar = float(s.alphas_cumprod[t])
        mean, var = math.sqrt(abar) * x0_value, 1.0 - abar
        se = math.sqrt(var / n)
        assert abs(xt.mean() - mean) < 5 * se
        # Var of a sample variance ~ 2 var^2 / n for a Gaussian.
        assert abs(xt.var() - var) < 5 * var * math.sqrt(2 / n)


def test_q_posterior_matches_bayes_rule():
    # q(x_{t-1} | x_t, x0) from q(x_t | x_{t-1}) q(x_{t-1} | x0) by completing the square, in float64.
    s = make_schedule("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    t, x0, xt = 400, 0.3, -0.8
    prec = (1 - betas[t]) / betas[t] + 1 / (1 - abar[t - 1])
    mean = (np.sqrt(1 - betas[t]) * xt / betas[t] + np.sqrt(abar[t - 1]) * x0 / (1 - abar[t - 1])) / prec
    m, v, _ = q_posterior(s, jnp.array([[x0]]), jnp.array([[xt]]), jnp.array([t]))
    assert float(m[0, 0]) == pytest.approx(mean, rel=1e-4)
    assert float(v[0, 0]) == pytest.approx(1 / prec, rel=1e-4)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "sigmoid"])
def test_continuous_view_agrees_with_discrete_on_the_grid(name):
    T = 1000
    disc = make_schedule(name, T)
    cont = ContinuousSchedule.from_config(name, T)
    i = np.array([0, 10, 250, 500, 900, 998])
    got = np.asarray(cont.log_alpha_bar(jnp.asarray((i + 1) / T)))
    # linear: the VP-SDE limit differs from the discrete product by O(beta^2) per step and by the
    # grid offset of beta(t) (about 0.07 in log abar at t = 1, where log abar = -10).
    tol = {"linear": 0.1, "cosine": 2e-3}.get(name, 1e-4)
    np.testing.assert_allclose(got, np.log(np.asarray(disc.alphas_cumprod, np.float64)[i]), rtol=0, atol=tol)
    assert float(cont.alpha_bar(0.0)) == pytest.approx(1.0)
    t = jnp.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(cont.alpha(t) ** 2 + cont.sigma(t) ** 2, 1.0, atol=1e-5)
    assert np.all(np.diff(np.asarray(cont.log_snr(t))) < 0)


def test_continuous_linear_is_the_vp_sde():
    cont = ContinuousSchedule.from_config("linear", 1000)
    t = 0.37
    expected = math.exp(-(0.1 * t + 0.5 * (20.0 - 0.1) * t ** 2))
    assert float(cont.alpha_bar(t)) == pytest.approx(expected, rel=1e-5)


def test_bad_schedule_arguments_name_the_key():
    with pytest.raises(ValueError, match="schedule.name"):
        make_schedule("quadratic", 1000)
    with pytest.raises(ValueError, match="schedule.num_timesteps"):
        schedules.beta_schedule("linear", 0)
