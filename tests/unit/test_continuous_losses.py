"""Continuous-time training objectives: EDM (edm.py), denoising score matching (dsm.py), VDM's VLB (vdm.py).

Reference values are computed here independently, in numpy / scipy from the papers' formulas: EDM's Table 1
coefficients, Gaussian-data optima (for x0 ~ N(0, s0^2 I) the posterior variance of x0 given x = alpha x0 + sigma z
is alpha^-2 s0^2 sigma^2 / (s0^2 + sigma^2 / alpha^2), so every weighted loss at the optimum is a 1-D integral over the
noise level), and VP / linear-gamma schedules written out again. Monte-Carlo checks use "rbg" keys (the losses take
any key): XLA's RngBitGenerator compiles several times faster on CPU than threefry, and compiling is most of the time.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from diffusion_jax.process import vdm as pvdm
from diffusion_jax.objectives import dsm, edm, vdm
from diffusion_jax.objectives.discrete import read_batch
from diffusion_jax.process import sde as sdes
from diffusion_jax.samplers import run_sampler
from diffusion_jax.samplers.grid import continuous_grid

SD = 0.5                     # sigma_data
SHAPE = (2048, 2, 2, 2)      # tiny images: 8 pixels each


def _key(i):
    return jax.random.key(i, impl="rbg")


def _mc(loss_fn, *args, n_keys=8):
    """Mean and standard error of loss_fn(*args, key) -> scalar over n_keys independent batches (one compile)."""
    f = jax.jit(loss_fn)
    vals = np.array([float(f(*args, _key(100 + i))) for i in range(n_keys)])
    return vals.mean(), vals.std(ddof=1) / math.sqrt(n_keys)


def _normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _gauss_batch(std, shape=SHAPE, seed=0):
    return {"image": jnp.asarray(std * _normal(shape, seed))}


# ===================================================================================================== EDM
def test_edm_precond_matches_table_1():
    sigma = np.array([0.002, 0.5, 80.0])
    c = edm.edm_precond(jnp.asarray(sigma), SD)
    var = sigma ** 2 + SD ** 2                                     # Karras et al. 2022, Table 1 ("ours")
    np.testing.assert_allclose(c.c_skip, SD ** 2 / var, rtol=1e-6)
    np.testing.assert_allclose(c.c_out, sigma * SD / np.sqrt(var), rtol=1e-6)
    np.testing.assert_allclose(c.c_in, 1 / np.sqrt(var), rtol=1e-6)
    np.testing.assert_allclose(c.c_noise, np.log(sigma) / 4, rtol=1e-6)
    np.testing.assert_allclose(edm.edm_loss_weight(sigma, SD), var / (sigma * SD) ** 2, rtol=1e-6)
    # by hand at sigma = sigma_d = 0.5: c_skip 1/2, c_out 0.25/sqrt(0.5), c_in sqrt(2), c_noise ln(0.5)/4, lambda 8
    np.testing.assert_allclose([float(v[1]) for v in c], [0.5, 0.35355339, 1.41421356, -0.17328680], rtol=1e-6)
    np.testing.assert_allclose(edm.edm_loss_weight(0.5, SD), 8.0, rtol=1e-6)
    # at the ends: D ~ x at sigma_min (c_skip ~ 1, c_out ~ sigma), D ~ sigma_d F at sigma_max (c_skip ~ 0)
    np.testing.assert_allclose([c.c_skip[0], c.c_out[0]], [0.99998400, 0.00199998400], rtol=1e-6)
    np.testing.assert_allclose([c.c_skip[2], c.c_out[2]], [3.9060974e-05, 0.49999023], rtol=1e-5)


def test_edm_precond_properties():
    sigma = jnp.geomspace(0.002, 80.0, 50)
    c = edm.edm_precond(sigma, SD)
    np.testing.assert_allclose(edm.edm_precond(SD, SD).c_skip, 0.5, rtol=1e-7)
    np.testing.assert_allclose(edm.edm_loss_weight(sigma, SD) * c.c_out ** 2, 1.0, rtol=1e-5)   # unit target weight
    np.testing.assert_allclose(c.c_in ** 2 * (sigma ** 2 + SD ** 2), 1.0, rtol=1e-5)             # unit input variance
    # the effective target (y - c_skip x) / c_out has unit variance for y ~ N(0, sigma_d^2)
    np.testing.assert_allclose(((1 - c.c_skip) ** 2 * SD ** 2 + c.c_skip ** 2 * sigma ** 2) / c.c_out ** 2, 1.0,
                               rtol=1e-4)


def test_edm_denoise_is_eq_7():
    seen = {}

    def apply_fn(p, x, t, y=None, train=False, dropout_key=None):
        seen["x"], seen["t"] = x, t
        return p * x + t[:, None, None, None]

    x = jnp.asarray(_normal((3, 2, 2, 1), 1))
    sigma = jnp.array([0.01, 1.0, 30.0])
    d = edm.edm_denoise(apply_fn, 0.7, x, sigma, SD)
    s = np.asarray(sigma)[:, None, None, None]
    c_in, c_noise = 1 / np.sqrt(s ** 2 + SD ** 2), np.log(s) / 4
    np.testing.assert_allclose(seen["x"], c_in * x, rtol=1e-6)
    np.testing.assert_allclose(seen["t"], c_noise.reshape(-1), rtol=1e-6)
    want = SD ** 2 / (s ** 2 + SD ** 2) * x + s * SD / np.sqrt(s ** 2 + SD ** 2) * (0.7 * c_in * x + c_noise)
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-6)


def test_sigma_sampling_is_lognormal():
    log_s = np.log(np.asarray(edm.sample_sigma(_key(3), (200_000,)), np.float64))
    se = 1.2 / math.sqrt(log_s.size)
    assert abs(log_s.mean() + 1.2) < 4 * se
    assert abs(log_s.std() - 1.2) < 4 * se
    assert abs(np.mean(((log_s + 1.2) / 1.2) ** 3)) < 0.02                 # symmetric


def _optimal_f(params, x_in, c_noise, y=None, train=False, dropout_key=None):
    """F of the exact denoiser D = s0^2 / (s0^2 + sigma^2) x for data N(0, s0^2 I), from F's own inputs, plus an
    offset: params = (s0, offset)."""
    s0, offset = params
    sigma = jnp.exp(4 * c_noise)[:, None, None, None]
    x = x_in * jnp.sqrt(sigma ** 2 + SD ** 2)
    d = s0 ** 2 / (s0 ** 2 + sigma ** 2) * x
    return (d - SD ** 2 / (sigma ** 2 + SD ** 2) * x) / (sigma * SD / jnp.sqrt(sigma ** 2 + SD ** 2)) + offset


def _edm_gauss_loss(s0, offset, key):
    batch = {"image": s0 * _normal(SHAPE)}
    return edm.edm_loss(_optimal_f, sdes.EDMSchedule(sigma_data=SD), edm.EDMLossConfig(), (s0, offset), batch, key)[0]


def _edm_minimum(s0):
    """E_sigma[lambda(sigma) s0^2 sigma^2 / (s0^2 + sigma^2)], ln sigma ~ N(-1.2, 1.2^2), by Gauss-Hermite."""
    u, w = np.polynomial.hermite_e.hermegauss(80)
    s = np.exp(-1.2 + 1.2 * u)
    return float(np.sum(w * (s ** 2 + SD ** 2) / (s * SD) ** 2 * s0 ** 2 * s ** 2 / (s0 ** 2 + s ** 2)) / w.sum())


@pytest.mark.parametrize("s0", [SD, 0.3])
def test_edm_loss_at_the_gaussian_optimum(s0):
    best, se = _mc(_edm_gauss_loss, s0, 0.0)
    want = _edm_minimum(s0)                    # = 1 exactly when s0 = sigma_d (then F = 0)
    if s0 == SD:
        assert want == pytest.approx(1.0, abs=1e-9)
    assert abs(best - want) < max(4 * se, 2e-3), (best, want, se)
    # F + 0.1: lambda c_out^2 = 1, so the loss rises by 0.1^2 in expectation (cross term has mean 0)
    worse, _ = _mc(_edm_gauss_loss, s0, 0.1)
    assert worse > best
    assert worse - best == pytest.approx(0.01, abs=2e-3)


def test_edm_loss_labels_and_output_shape():
    batch = {"image": _gauss_batch(SD, (64, 2, 2, 1))["image"], "label": jnp.asarray(np.arange(64) % 3)}
    seen = {}

    def apply_fn(p, x, t, y=None, train=False, dropout_key=None):
        seen["y"] = y
        return p * x

    cfg = edm.EDMLossConfig(cond_drop_prob=0.5)
    loss, metrics = jax.jit(lambda p: edm.edm_loss(apply_fn, sdes.EDMSchedule(), cfg, p, batch, _key(0),
                                                   num_classes=3))(0.3)
    assert set(metrics) == {"loss", "mse"} and np.isfinite(float(loss)) and seen["y"].shape == (64,)
    _, dropped = read_batch(batch, _key(1), 3, 0.5)                  # what the losses feed the network
    assert set(np.asarray(dropped["y"]).tolist()) == {0, 1, 2, 3}    # 3 = the null class, about half of them
    with pytest.raises(ValueError, match="apply_fn returned shape"):
        jax.eval_shape(lambda: edm.edm_loss(lambda p, x, t, **kw: x[..., :0], sdes.EDMSchedule(), cfg, 0.3, batch,
                                            _key(0)))


def test_captions_drop_with_their_labels_to_the_null_context():
    """Text conditioning (latent diffusion): a dropped example gets the null class and the empty caption's
    embedding together; every loss passes the context to the network."""
    B = 64
    batch = {"image": jnp.zeros((B, 2, 2, 1)), "label": jnp.asarray(np.arange(B) % 3),
             "context": jnp.ones((B, 4, 5)), "null_context": jnp.full((B, 4, 5), -1.0)}
    _, cond = read_batch(batch, _key(1), 3, 0.5)
    null = np.asarray(cond["y"]) == 3
    assert 0 < null.sum() < B
    np.testing.assert_array_equal(np.asarray(cond["context"])[:, 0, 0], np.where(null, -1.0, 1.0))
    _, kept = read_batch(batch, _key(1), 3, 0.0)
    assert np.all(np.asarray(kept["context"]) == 1.0)
    with pytest.raises(ValueError, match="null_context"):
        read_batch({k: v for k, v in batch.items() if k != "null_context"}, _key(1), 3, 0.5)
    seen = {}

    def apply_fn(p, x, t, y=None, context=None, train=False, dropout_key=None):
        seen["context"] = context
        return p * x

    edm.edm_loss(apply_fn, sdes.EDMSchedule(), edm.EDMLossConfig(), 0.3, batch, _key(0), num_classes=3)
    assert seen["context"].shape == (B, 4, 5)


def test_edm_heun_paper_defaults_35_nfe_at_32x32():
    """EDM Alg. 1 with Table 1's defaults (18 steps, sigma in [0.002, 80], rho = 7, S_churn = 0): 2 * 18 - 1 = 35."""
    sched = sdes.EDMSchedule(sigma_min=0.002, sigma_max=80.0, sigma_data=SD)
    grid = continuous_grid(sched, 18, "karras", rho=7.0)
    i = np.arange(18)
    karras = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7        # EDM eq. 5
    np.testing.assert_allclose(grid.sigma[:-1], karras, rtol=1e-5)
    # data N(0, sigma_d^2 I): the exact D is c_skip x, i.e. F = 0, and the PF-ODE dy/ds = y s / (s^2 + sigma_d^2) is
    # linear, so Heun (Alg. 1) multiplies x_T by a gain computed here step by step in float64
    denoise_fn = edm.edm_denoise_fn(lambda p, x, t, **kw: jnp.zeros_like(x), None, SD)
    x_T = 80.0 * _normal((2, 32, 32, 3), 2)
    x, info = run_sampler("edm", denoise_fn, sched, _key(0), x_T.shape, steps=18, prediction="edm",
                          spacing="karras", rho=7.0, options={"s_churn": 0.0}, x_T=x_T)
    assert info["nfe"] == 35
    s, gain = np.append(karras, 0.0), 1.0
    deriv = lambda y, s: y * s / (s * s + SD * SD)
    for s_cur, s_next in zip(s[:-1], s[1:]):
        d = deriv(gain, s_cur)
        y_next = gain + (s_next - s_cur) * d
        gain = gain + (s_next - s_cur) * 0.5 * (d + deriv(y_next, s_next)) if s_next > 0 else y_next
    np.testing.assert_allclose(x, gain * x_T, rtol=2e-4, atol=1e-6)
    # the exact ODE gives gain sigma_d / sqrt(80^2 + sigma_d^2); 18 Heun steps land 5.5% above it
    assert gain * math.sqrt(80 ** 2 + SD ** 2) / SD == pytest.approx(1.0553, abs=1e-3)


# ===================================================================================================== DSM
ALL_SDES = [sdes.VPSDE(), sdes.SubVPSDE(), sdes.VESDE(), sdes.EDMSchedule()]


def _vp_np(t, b0=0.1, b1=20.0):
    """VP SDE written out: (alpha, sigma^2, g^2) at t."""
    big_b = b0 * t + 0.5 * (b1 - b0) * t ** 2
    return np.exp(-0.5 * big_b), -np.expm1(-big_b), b0 + t * (b1 - b0)


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_g2_over_sigma2_is_minus_dlogsnr_dt(sde):
    t = jnp.linspace(sde.t_min * 2, sde.t_max, 7)
    dlog = jax.vmap(jax.grad(lambda s: sde.log_snr(s)))(t)
    np.testing.assert_allclose(sde.g2(t) / sde.sigma(t) ** 2, -dlog, rtol=2e-3)


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_importance_density_integrates_to_one(sde):
    eps = 1e-5 if sde.t_max == 1.0 else sde.t_min
    u = np.linspace(np.log(eps), np.log(sde.t_max), 20001)          # log-spaced: p(t) ~ 1/t near eps
    t = np.exp(u)
    p = np.asarray(dsm.importance_density(sde, jnp.asarray(t, jnp.float32), eps), np.float64)
    np.testing.assert_allclose(np.trapezoid(p * t, u), 1.0, rtol=2e-3)


def test_importance_sampling_inverse_cdf_vp():
    """Sampled t follow the CDF obtained by integrating beta / (1 - e^-B) numerically (score_flow's density)."""
    eps = 1e-5
    t = np.asarray(dsm.sample_importance_time(sdes.VPSDE(), _key(5), (40_000,), eps), np.float64)
    assert t.min() >= eps and t.max() <= 1.0
    dens = lambda s: _vp_np(s)[2] / _vp_np(s)[1]
    z = integrate.quad(dens, eps, 1.0, points=[1e-4, 1e-3, 1e-2, 1e-1], limit=200)[0]
    for q in (1e-4, 1e-3, 1e-2, 0.1, 0.5):
        cdf = integrate.quad(dens, eps, q, limit=200)[0] / z
        assert abs(np.mean(t <= q) - cdf) < 4 * math.sqrt(cdf * (1 - cdf) / t.size) + 1e-3, (q, cdf)


def _exact_score_vp(s0, c=1.0):
    """c times the exact score -x / (alpha^2 s0^2 + sigma^2) of N(0, s0^2 I) data under the VP SDE (network time
    999 t)."""
    sde = sdes.VPSDE()

    def apply_fn(p, x, t_net, y=None, train=False, dropout_key=None):
        t = t_net / sde.time_scale
        v = (sde.alpha(t) ** 2 * s0 ** 2 + sde.sigma(t) ** 2)[:, None, None, None]
        return -c * x / v
    return apply_fn


def _dsm_reference(s0, c, weighting, eps):
    """E_{t~U(eps,1)} lambda / sigma^2 E||eps_hat - z||^2 per pixel for the score c (exact score): with
    v = alpha^2 s0^2 + sigma^2, E||eps_hat - z||^2 = 1 + (c^2 - 2c) sigma^2 / v."""
    def integrand(t):
        a, s2, g2 = _vp_np(t)
        lam_over_s2 = 1.0 if weighting == "snr" else g2 / s2
        return lam_over_s2 * (1 + (c * c - 2 * c) * s2 / (a * a * s0 ** 2 + s2))
    return integrate.quad(integrand, eps, 1.0, points=[1e-4, 1e-3, 1e-2, 1e-1], limit=200)[0] / (1 - eps)


def test_dsm_exact_score_gives_irreducible_value():
    s0, sde = 0.5, sdes.VPSDE()
    batch = _gauss_batch(s0)
    for pred in ("score", "eps"):
        fn = _exact_score_vp(s0)
        if pred == "eps":     # eps_hat = -sigma score
            fn = (lambda f: lambda p, x, t, **kw: -sde.sigma(t / 999.0)[:, None, None, None] * f(p, x, t))(fn)
        cfg = dsm.DSMConfig(prediction=pred, weighting="snr")
        got, se = _mc(lambda k: dsm.dsm_loss(fn, sde, cfg, None, batch, k)[0])
        want = _dsm_reference(s0, 1.0, "snr", cfg.eps)         # = E_t[alpha^2 s0^2 / v]
        assert abs(got - want) < 4 * se + 1e-3, (pred, got, want, se)


def test_dsm_likelihood_importance_sampling_is_unbiased():
    s0, c, eps, sde = 0.5, 0.8, 1e-2, sdes.VPSDE()
    batch, fn = _gauss_batch(s0, (8192, 2, 2, 2)), _exact_score_vp(s0, c)
    want = _dsm_reference(s0, c, "likelihood", eps)
    means = {}
    for imp in (False, True):
        cfg = dsm.DSMConfig(weighting="likelihood", importance_sampling=imp, eps=eps)
        means[imp], se = _mc(lambda k: dsm.dsm_loss(fn, sde, cfg, None, batch, k)[0], n_keys=16)
        assert abs(means[imp] - want) < 4 * se + 1e-3 * want, (imp, means[imp], want, se)
    assert means[True] == pytest.approx(means[False], rel=0.03)


def test_dsm_config_errors():
    with pytest.raises(ValueError, match="importance_sampling"):
        dsm.DSMConfig(importance_sampling=True).validate()
    with pytest.raises(ValueError, match="prediction"):
        dsm.DSMConfig(prediction="edm").validate()


# ===================================================================================================== VDM
G_MIN, G_MAX = -13.3, 5.0


def _levels_batch(shape=(512, 2, 2, 2), seed=0):
    k = np.random.default_rng(seed).integers(0, 256, shape)
    return {"image": jnp.asarray(k / 127.5 - 1.0, jnp.float32)}


def test_vdm_linear_gamma_diffusion_loss_is_unbiased():
    """eps_hat = c z; E||eps - c z||^2 per pixel = (1 - c sigma)^2 + c^2 alpha^2 x^2, integrated over t numerically."""
    c, batch = 0.7, _levels_batch()
    m2 = float(jnp.mean(batch["image"] ** 2))
    sched, cfg = pvdm.LinearGamma(G_MIN, G_MAX), vdm.VDMLossConfig()
    fn = lambda p, z, t, **kw: c * z

    def integrand(t):
        g = G_MIN + (G_MAX - G_MIN) * t
        a2, s2 = 1 / (1 + np.exp(g)), 1 / (1 + np.exp(-g))
        return 0.5 * (G_MAX - G_MIN) * ((1 - c * np.sqrt(s2)) ** 2 + c * c * a2 * m2)
    want = integrate.quad(integrand, 0.0, 1.0)[0] / math.log(2)
    for antithetic in (True, False):
        cfg = vdm.VDMLossConfig(antithetic_time_sampling=antithetic)
        got, se = _mc(lambda k: vdm.vdm_loss(fn, sched, cfg, None, {}, batch, k)[1]["diff_bpd"], n_keys=16)
        assert abs(got - want) < 4 * se + 1e-3, (antithetic, got, want, se)


def test_vdm_prior_and_reconstruction_terms():
    x = _levels_batch((4, 2, 2, 2))["image"]
    g1 = 5.0
    mu, s2 = np.sqrt(1 / (1 + np.exp(g1))) * np.asarray(x), 1 / (1 + np.exp(-g1))
    kl = np.sum((np.log(1 / np.sqrt(s2)) + (s2 + mu ** 2) / 2 - 0.5).reshape(4, -1), axis=-1)
    np.testing.assert_allclose(vdm.prior_kl(x, jnp.float32(g1)), kl, rtol=1e-4)
    e0 = jnp.asarray(_normal((256,) + x.shape[1:], 1))
    xs = jnp.broadcast_to(x[:1], e0.shape)
    sharp = float(jnp.mean(vdm.reconstruction_nll(xs, jnp.float32(G_MIN), e0))) / (8 * math.log(2))
    flat = float(jnp.mean(vdm.reconstruction_nll(xs, jnp.float32(12.0), e0))) / (8 * math.log(2))
    assert 0 <= sharp < 0.02          # sigma_0 / alpha_0 = e^-6.65, a sixth of the level spacing: almost exact
    assert flat == pytest.approx(8.0, abs=0.01)          # pure noise: uniform over 256 levels = 8 bits


def _random_params(tree, seed):
    """Every leaf N(0, 3^2): negative weights too (the layers use |W|)."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [3 * _normal(v.shape, seed + i) for i, v in enumerate(leaves)])


@pytest.mark.parametrize("fixed", [False, True])
def test_learned_gamma_is_monotone_with_requested_endpoints(fixed):
    sched = pvdm.MonotoneGamma(G_MIN, G_MAX, n_features=64, fixed_endpoints=fixed)
    init = sched.init(_key(0))
    t = jnp.linspace(0.0, 1.0, 2001)
    gamma = jax.jit(lambda p, t: vdm.gamma_and_derivative(sched, p, t))
    np.testing.assert_allclose(gamma(init, t)[0], G_MIN + (G_MAX - G_MIN) * t, atol=0.05)   # starts near linear
    for seed in range(5):
        p = _random_params(init, 10 * seed)
        g, dg = gamma(p, t)
        assert bool(jnp.all(jnp.diff(g) > 0)) and bool(jnp.all(dg > 0)), seed
        if fixed:
            np.testing.assert_allclose([g[0], g[-1]], [G_MIN, G_MAX], atol=1e-4)


def test_vdm_loss_gradients_reach_both_param_trees():
    sched = pvdm.MonotoneGamma(G_MIN, G_MAX, n_features=16)
    gp = sched.init(_key(0))
    batch = _levels_batch((8, 2, 2, 1))
    fn = lambda p, z, t, **kw: p * z + 1e-3 * t[:, None, None, None]
    loss = lambda p, q: vdm.vdm_loss(fn, sched, vdm.VDMLossConfig(), p, q, batch, _key(3))
    (bpd, metrics), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(0.5, gp)
    assert np.isfinite(float(bpd))
    np.testing.assert_allclose(bpd, metrics["diff_bpd"] + metrics["prior_bpd"] + metrics["recon_bpd"], rtol=1e-5)
    assert float(jnp.abs(grads[0])) > 0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads[1]))
    assert float(jnp.abs(grads[1]["l1"]["b"]).sum()) > 0        # gamma_0 / gamma_1 are learned through the VLB
