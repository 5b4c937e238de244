"""The exact-score testbed: closed forms against autodiff and Monte Carlo, samplers against the PF-ODE
ground truth, metrics against brute force and their own standard errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from diffusion_jax.objectives.param import convert
from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.process import sde as sdes
from diffusion_jax.samplers import run_sampler
from diffusion_jax.testbed import (
    GaussianMixture,
    alpha_sigma_denoiser,
    discrete_denoise_fn,
    edm_denoiser,
    gaussian_w2,
    mean_log_likelihood,
    mixture_mmd2,
    moment_errors,
    reference_ode_solution,
    single_gaussian_pf_ode,
)

D = 8
KEY = jax.random.key(0)
AS = [(1.0, 0.0), (0.8, 0.6), (0.3, 0.954), (0.0, 1.0), (np.linspace(0.1, 1.0, 16), np.linspace(1.0, 0.05, 16))]


@pytest.fixture(scope="module")
def mix():
    return GaussianMixture.random(KEY, num_components=6, dim=D)


@pytest.fixture(scope="module")
def sched():
    return make_schedule("linear", 1000)


def _x(n=16, d=D, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, d))


# ------------------------------------------------------------------------------------------ closed forms
def test_random_mixture_shape_and_range(mix):
    assert mix.means.shape == (6, D) and mix.weights.shape == mix.stds.shape == (6,)
    np.testing.assert_allclose(float(mix.weights.sum()), 1.0, rtol=1e-6)
    x = np.asarray(mix.sample(KEY, 4096))
    assert np.quantile(np.abs(x), 0.99) < 1.0
    dist = np.sqrt(((mix.means[:, None] - mix.means[None]) ** 2).sum(-1)) + np.eye(6) * 99
    assert dist.min() > 6 * float(mix.stds.max())                        # well separated modes


@pytest.mark.parametrize("alpha,sigma", AS[:3] + AS[4:])
def test_score_is_grad_log_prob(mix, alpha, sigma):
    x = _x() * 0.7
    g = jax.grad(lambda x: mix.log_prob(x, alpha, sigma).sum())(x)
    np.testing.assert_allclose(mix.score(x, alpha, sigma), g, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("alpha,sigma", AS)
def test_tweedie_identities(mix, alpha, sigma):
    x = _x()
    x0, eps, sc = mix.x0_mean(x, alpha, sigma), mix.eps_mean(x, alpha, sigma), mix.score(x, alpha, sigma)
    a, s = (jnp.broadcast_to(jnp.asarray(v, jnp.float32), (16,))[:, None] for v in (alpha, sigma))
    np.testing.assert_allclose(a * x0 + s * eps, x, atol=2e-5)         # x = alpha E[x0|x] + sigma E[eps|x]
    np.testing.assert_allclose(eps, -s * sc, atol=2e-5, rtol=1e-5)
    ok = np.asarray(a[:, 0]) > 0.2
    np.testing.assert_allclose(np.asarray(x0)[ok], np.asarray((x + s ** 2 * sc) / a)[ok], atol=1e-4, rtol=1e-4)


def test_posterior_mean_is_conditional_expectation(mix):
    """E[x0 - E[x0|x]] = 0 and E[(x0 - E[x0|x]) x^T] = 0 by Monte Carlo, within 4.5 standard errors."""
    n, alpha, sigma = 20000, 0.6, 0.8
    k0, k1 = jax.random.split(KEY)
    x0 = mix.sample(k0, n)
    x = alpha * x0 + sigma * jax.random.normal(k1, x0.shape)
    res = np.asarray(x0 - mix.x0_mean(x, alpha, sigma), np.float64)
    for f in (res, res[:, :, None] * np.asarray(x)[:, None, :]):
        f = f.reshape(n, -1)
        assert np.all(np.abs(f.mean(0)) < 4.5 * f.std(0) / np.sqrt(n))


def test_single_component_closed_form():
    mu, s = jnp.linspace(-0.5, 0.5, D), 0.3
    one = GaussianMixture.create([1.0], mu[None], s)
    x = _x()
    for a, sg in AS[:4]:
        v = a ** 2 * s ** 2 + sg ** 2
        np.testing.assert_allclose(one.x0_mean(x, a, sg), mu + a * s ** 2 / v * (x - a * mu), atol=1e-5)
        np.testing.assert_allclose(one.score(x, a, sg), (a * mu - x) / v, rtol=1e-5, atol=1e-5)
        lp = -0.5 * jnp.sum((x - a * mu) ** 2, -1) / v - 0.5 * D * jnp.log(2 * jnp.pi * v)
        np.testing.assert_allclose(one.log_prob(x, a, sg), lp, rtol=1e-5)


def test_samples_match_moments(mix):
    x, comp = mix.sample(KEY, 20000, return_components=True)
    occ = np.bincount(np.asarray(comp), minlength=6) / 20000
    w = np.asarray(mix.weights)
    assert np.all(np.abs(occ - w) < 4.5 * np.sqrt(w * (1 - w) / 20000))
    for k in range(6):
        xk = np.asarray(x)[np.asarray(comp) == k]
        np.testing.assert_allclose(xk.mean(0), mix.means[k], atol=4.5 * float(mix.stds[k]) / np.sqrt(len(xk)))
        np.testing.assert_allclose((xk - xk.mean(0)).std(), float(mix.stds[k]), rtol=0.03)
    err = moment_errors(mix, x)
    assert err["occupancy_tv"] < 0.02 and abs(err["trace_cov_rel"]) < 0.03 and err["mean_rmse"] < 0.01


# ----------------------------------------------------------------------------------------------- adaptors
def test_adaptors_agree_with_conversions(mix, sched):
    x, t = _x(), jnp.arange(16) * 66
    a, s = (v[:, None] for v in sched.interpolated_level(t))
    preds = {p: discrete_denoise_fn(mix, sched, p)(x, t) for p in ("eps", "x0", "v", "score")}
    for p in ("x0", "v", "score"):
        np.testing.assert_allclose(convert(preds["eps"], "eps", p, x, a, s), preds[p], rtol=2e-3, atol=2e-3)
    for sig in (s[:, 0] / a[:, 0], s / a):                                    # sigma (B,) or (B, 1)
        np.testing.assert_allclose(edm_denoiser(mix)(x / a, sig), preds["x0"], rtol=1e-4, atol=1e-4)
    img = x.reshape(16, 2, 2, 2)                                               # (B, ...) inputs: flattened
    np.testing.assert_allclose(discrete_denoise_fn(mix, sched)(img, t).reshape(16, D), preds["eps"], atol=1e-6)


def test_fractional_timesteps_interpolate_log_snr(mix, sched):
    ti = jnp.array([0, 10, 500, 998])
    for u, v in zip(sched.interpolated_level(ti.astype(jnp.float32)), sched.interpolated_level(ti)):
        np.testing.assert_allclose(u, v, rtol=1e-4)
    a, s = sched.interpolated_level(ti + 0.25)
    lam = 0.75 * sched.log_snr(ti) + 0.25 * sched.log_snr(ti + 1)
    np.testing.assert_allclose(2 * (jnp.log(a) - jnp.log(s)), lam, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a ** 2 + s ** 2, 1.0, rtol=1e-6)
    x = _x(4)
    np.testing.assert_allclose(discrete_denoise_fn(mix, sched, "x0")(x, ti + 0.25),
                               alpha_sigma_denoiser(mix, "x0")(x, a, s), atol=1e-6)


# ------------------------------------------------------------------------------------- reference PF-ODE
def test_reference_matches_single_gaussian_analytic(sched):
    mu, s = np.linspace(-0.5, 0.5, D), 0.2
    one = GaussianMixture.create([1.0], mu[None], s)
    x_T = np.asarray(_x())
    aT, sT = sched.alpha(999), sched.sigma(999)
    ref = reference_ode_solution(one, x_T, sT, alpha_from=aT)
    assert not jax.config.x64_enabled and ref.dtype == np.float64
    exact = single_gaussian_pf_ode(mu, s, x_T, np.float64(sT), alpha_from=np.float64(aT))
    np.testing.assert_allclose(ref, exact, rtol=1e-8, atol=1e-8)
    # per-example starting levels, and stopping at an intermediate VP level (alpha_to, sigma_to)
    a, sg = np.linspace(0.2, 1.0, 16), np.sqrt(1 - np.linspace(0.2, 1.0, 16) ** 2) + 0.1
    ref = reference_ode_solution(one, x_T, sg, 0.6, alpha_from=a, alpha_to=0.8)
    y = mu + np.sqrt(s ** 2 + 0.75 ** 2) * (x_T / a[:, None] - mu) / np.sqrt(s ** 2 + (sg / a)[:, None] ** 2)
    np.testing.assert_allclose(ref, 0.8 * y, rtol=1e-7, atol=1e-7)
    assert not jax.config.x64_enabled


def test_ddim_converges_to_reference(mix, sched):
    """DDIM (eta = 0) is Euler on the PF-ODE in (x / alpha, sigma / alpha): error O(1 / steps)."""
    x_T = _x(64)
    ref = reference_ode_solution(mix, x_T, sched.sigma(999), alpha_from=sched.alpha(999))
    ref2 = reference_ode_solution(mix, x_T, sched.sigma(999), alpha_from=sched.alpha(999), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref, ref2, atol=1e-8)                              # self-convergence

    def ddim(steps, prediction="eps"):
        fn = discrete_denoise_fn(mix, sched, prediction)
        run = jax.jit(lambda x: run_sampler("ddim", fn, sched, KEY, x.shape, steps=steps, spacing="trailing",
                                            prediction=prediction, x_T=x)[0])
        return np.asarray(run(x_T), np.float64)

    err = {n: np.sqrt(np.mean((ddim(n) - ref) ** 2)) for n in (100, 1000)}
    assert err[1000] < 3e-3 and err[100] > 6 * err[1000], err
    for p in ("x0", "v", "score"):
        np.testing.assert_allclose(ddim(1000, p), ddim(1000), atol=2e-4)


def test_ddpm_samples_the_mixture(mix, sched):
    fn = discrete_denoise_fn(mix, sched, "eps")
    x, _ = jax.jit(lambda k: run_sampler("ddpm", fn, sched, k, (2000, D), steps=1000))(KEY)
    mmd2, se = mixture_mmd2(mix, x, 0.5, return_stderr=True)
    assert abs(mmd2) < 4.5 * se, (mmd2, se)
    assert moment_errors(mix, x)["occupancy_tv"] < 0.05


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("ddim", {})])
def test_ddpm_ddim_sample_the_mixture_on_continuous_processes(mix, name, options):
    """DDPM's posterior step and DDIM's eq. 12 written in (alpha, sigma) hold for any Gaussian process: on a
    continuous VP SDE and on EDM's VE levels, 200 steps of each sample the mixture (a sign error in the posterior
    mean or variance moves the MMD by tens of standard errors)."""
    f = alpha_sigma_denoiser(mix, "eps")
    vp, edm = sdes.VPSDE(t_min=1e-3), sdes.EDMSchedule()
    cases = (("VP", vp, "uniform", lambda x, t: f(x, vp.alpha(t / vp.time_scale), vp.sigma(t / vp.time_scale))),
             ("EDM", edm, "karras", lambda x, s: f(x, 1.0, s)))          # EDM's network time is sigma itself
    for label, process, spacing, den in cases:
        x, info = jax.jit(lambda k: run_sampler(name, den, process, k, (2000, D), steps=200, spacing=spacing,
                                                options=options))(KEY)
        assert info["nfe"] == 200
        mmd2, se = mixture_mmd2(mix, x, 0.5, return_stderr=True)
        assert abs(mmd2) < 4.5 * se, (label, name, options, mmd2, se)


# ----------------------------------------------------------------------------------------------- metrics
def test_mmd_unbiased_and_sensitive(mix):
    x = np.asarray(mix.sample(jax.random.key(3), 2000))
    mmd2, se = mixture_mmd2(mix, x, 0.5, return_stderr=True)
    assert abs(mmd2) < 4.5 * se and se < 1e-3, (mmd2, se)
    for bad in (x * 1.1, x + 0.05):
        m, s = mixture_mmd2(mix, bad, 0.5, return_stderr=True)
        assert m > 5 * se and m > 5 * s, (m, s)
    np.testing.assert_allclose(mixture_mmd2(mix, x, 0.5, block=300), mmd2, rtol=1e-10)


def test_log_likelihood(mix):
    one = GaussianMixture.create([1.0], np.zeros((1, D)), 0.3)
    x = one.sample(KEY, 20000)
    ll = mean_log_likelihood(one, x)
    np.testing.assert_allclose(ll["nats_per_dim"], -0.5 * np.log(2 * np.pi * np.e * 0.09), atol=0.01)
    y = mix.sample(KEY, 2000)
    assert mean_log_likelihood(mix, y)["nats"] > mean_log_likelihood(mix, y * 1.1)["nats"] + 1.0


def test_gaussian_w2_matches_sqrtm():
    for n, d in ((500, 5), (40, 60)):                                           # n > d and n < d
        m = GaussianMixture.random(jax.random.key(d), 4, d)
        x = np.asarray(m.sample(jax.random.key(1), n), np.float64) * 1.05 + 0.01
        w, mu, s = (np.asarray(a, np.float64) for a in (m.weights, m.means, m.stds))
        mp = w @ mu
        cp = np.diag(np.full(d, w @ s ** 2)) + (mu - mp).T @ np.diag(w) @ (mu - mp)
        cq, mq = np.cov(x, rowvar=False), x.mean(0)
        r = scipy.linalg.sqrtm(cp)
        brute = np.sum((mp - mq) ** 2) + np.trace(cp + cq) - 2 * np.trace(scipy.linalg.sqrtm(r @ cq @ r)).real
        np.testing.assert_allclose(gaussian_w2(m, x), brute, rtol=1e-6, atol=1e-8)


def test_gaussian_w2_small_for_true_samples(mix):
    x = np.asarray(mix.sample(jax.random.key(5), 4000))
    good = gaussian_w2(mix, x)
    assert good < 2e-3 and gaussian_w2(mix, x * 1.1) > 5 * good and gaussian_w2(mix, x + 0.05) > 5 * good
