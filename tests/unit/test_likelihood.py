"""Likelihoods against independent truths: the PF-ODE log-likelihood (exact trace, Hutchinson) against the Gaussian
mixture's closed-form log-density, bits/dim against exact discrete entropies (Gaussian CDFs over the 8-bit bins),
the DDPM VLB as an upper bound (mixture) and as an equality (Gaussian data with the exact reverse kernels), the CLI."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_ndtr, logsumexp

from diffusion_jax.cli.main import main
from diffusion_jax.inference.likelihood import bits_per_dim, ddpm_vlb, dequantize, ode_log_likelihood
from diffusion_jax.process import vdm as pvdm
from diffusion_jax.process import sde as sdes
from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.process.flow import RectifiedFlow
from diffusion_jax.samplers.grid import start_time
from diffusion_jax.testbed import (GaussianMixture, alpha_sigma_denoiser, discrete_denoise_fn, edm_denoiser,
                                   process_denoise_fn)

D, N = 4, 256
VP = sdes.VPSDE(t_min=1e-5)             # score_sde's likelihood eps: s_0 ~ 1e-3, far below the component stds
DDPM = make_schedule("linear", 1000)
SHORT = make_schedule("linear", 100, beta_start=1e-3, beta_end=0.2)   # the VLB's T network calls: 100 keep tests fast


@pytest.fixture(scope="module")
def mix():
    return GaussianMixture.random(jax.random.key(0), num_components=5, dim=D, std=0.2, std_spread=0.3)


@pytest.fixture(scope="module")
def data(mix):
    x = mix.sample(jax.random.key(1), N)
    return x, np.asarray(mix.log_prob(x), np.float64)


def _vp_net(mix):                        # a "network" on score_sde's time input t * 999
    f = alpha_sigma_denoiser(mix, "eps")
    return lambda x, t: f(x, VP.alpha(t / VP.time_scale), VP.sigma(t / VP.time_scale))


@pytest.fixture(scope="module")
def vp_exact(mix):
    return jax.jit(lambda x: ode_log_likelihood(_vp_net(mix), VP, x, prediction="eps"))


# ------------------------------------------------------------------------------- PF-ODE vs the true density
def _case(kind, mix, vp_exact):
    """(jitted x -> (logp, info), (alpha, sigma) at t_min, (alpha, sigma) at t_max) of a schedule on the testbed."""
    if kind == "vp":
        return vp_exact, (VP.alpha(VP.t_min), VP.sigma(VP.t_min)), (VP.alpha(VP.t_max), VP.sigma(VP.t_max))
    if kind == "edm":
        edm = sdes.EDMSchedule()
        run = jax.jit(lambda x: ode_log_likelihood(edm_denoiser(mix), edm, x, prediction="edm"))
        return run, (1.0, edm.t_min), (1.0, edm.t_max)
    if kind == "vdm":   # a learned, strongly curved gamma on [-13.3, 10] (VP's alpha(1) = 0.0067, so the N(0, I)
        # prior fits as well as VP's); the network sees VDM's time input, the normalised gamma
        gamma = pvdm.MonotoneGamma(gamma_max=10.0, n_features=16, fixed_endpoints=True)
        p = gamma.init(jax.random.key(2))
        p["l1"]["w"], p["l3"]["w"] = jnp.full((1, 1), 2.0), 20.0 * jnp.abs(p["l3"]["w"]) / 0.01
        sched, f = pvdm.VDMSchedule(gamma, p), alpha_sigma_denoiser(mix, "eps")
        net = lambda x, t: f(x, *pvdm.alpha_sigma(-13.3 + 23.3 * t / 1000.0))
        run = jax.jit(lambda x: ode_log_likelihood(net, sched, x, prediction="eps"))
        return run, (sched.alpha(0.0), sched.sigma(0.0)), (sched.alpha(1.0), sched.sigma(1.0))
    if kind == "flow":   # the exact velocity; the ODE starts where alpha^2 = 2^-24 (start_time), prior N(0, ~1)
        flow = RectifiedFlow()
        run = jax.jit(lambda x: ode_log_likelihood(process_denoise_fn(mix, flow, "flow"), flow, x, prediction="flow"))
        t1 = start_time(flow)
        return run, (flow.alpha(flow.t_min), flow.sigma(flow.t_min)), (flow.alpha(t1), flow.sigma(t1))
    fn = discrete_denoise_fn(mix, DDPM, "v")
    run = jax.jit(lambda x: ode_log_likelihood(fn, DDPM, x, prediction="v"))
    return run, (DDPM.alpha(0), DDPM.sigma(0)), (DDPM.alpha(999), DDPM.sigma(999))


@pytest.mark.parametrize("kind", ["vp", "edm", "ddpm", "vdm", "flow"])
def test_exact_trace_matches_mixture_log_density(mix, data, vp_exact, kind):
    x, truth = data
    run, level0, level1 = _case(kind, mix, vp_exact)
    logp, info = run(x)
    assert bool(info["success"]) and info["jvps_per_eval"] == D and int(info["nfe"]) == 6 * int(info["num_steps"]) + 1
    err = np.abs(np.asarray(logp, np.float64) - truth) / D
    assert err.max() < 0.01, (kind, err.max())
    # Isolate the solver: swap the N(0, .) prior for the exact marginal at t_max and compare with the exact
    # marginal at t_min (what the ODE transports); what is left is the ODE tolerance and float32
    exact_prior = np.asarray(mix.log_prob(info["latent"], *level1), np.float64)
    at_t_min = np.asarray(mix.log_prob(x, *level0), np.float64)
    solver_err = np.abs(np.asarray(info["delta"], np.float64) + exact_prior - at_t_min) / D
    assert solver_err.max() < 1e-3, (kind, err.max(), solver_err.max())
    if kind == "vp":   # under vmap: independent solves (own step sizes) of 4 groups, as accurate
        lv, iv = jax.jit(jax.vmap(lambda xi: ode_log_likelihood(_vp_net(mix), VP, xi, prediction="eps")))(
            x[:16].reshape(4, 4, D))
        assert iv["nfe"].shape == (4,) and np.abs(np.asarray(lv).ravel() - truth[:16]).max() / D < 0.01


@pytest.mark.parametrize("trace", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_its_standard_error(mix, data, trace):
    x, truth = data
    K = 8
    run = jax.jit(lambda x, k: ode_log_likelihood(_vp_net(mix), VP, x, prediction="eps", key=k, trace=trace,
                                                  num_probes=K))
    logp, info = run(x, jax.random.key(2))
    assert bool(info["success"]) and info["jvps_per_eval"] == K
    err, se = np.asarray(logp, np.float64) - truth, np.asarray(info["delta_stderr"], np.float64)
    # unbiased: the mean error over examples within 3 of its standard errors
    assert abs(err.mean()) < 3 * err.std(ddof=1) / math.sqrt(N), (err.mean(), err.std())
    # each example within ~3 of its own (8-probe, t-distributed) standard errors; the reported standard errors
    # describe the actual spread of the errors
    assert np.mean(np.abs(err) <= 3 * se) > 0.9, np.mean(np.abs(err) <= 3 * se)
    assert 0.6 < err.std() / math.sqrt(np.mean(se ** 2)) < 1.5, (err.std(), np.mean(se ** 2))
    # the same probes for the same key: a deterministic estimate
    np.testing.assert_array_equal(run(x, jax.random.key(2))[0], logp)


# ------------------------------------------------------------------------------------------------ bits/dim
def test_bits_per_dim_offset_on_known_densities():
    # the uniform density on [-1, 1]^D: 8-bit data with 256 equally likely levels is exactly 8 bits/dim
    assert float(bits_per_dim(-5 * math.log(2.0), 5)) == pytest.approx(8.0, abs=1e-6)
    # N(0, 0.25^2) in 1-D: the exact entropy of k = floor((x + 1) 128) (Gaussian CDF over the bins) vs the
    # Monte-Carlo bits/dim of the dequantized data under the density
    s, n = 0.25, 200_000
    rng = np.random.default_rng(0)
    edges = np.concatenate([[-np.inf], np.arange(1, 256) / 128.0 - 1.0, [np.inf]])
    mass = np.diff(np.exp(log_ndtr(edges / s)))
    entropy = float(-np.sum(mass[mass > 0] * np.log2(mass[mass > 0])))
    k = np.clip(np.floor((rng.normal(0, s, n) + 1) * 128), 0, 255)
    xq = dequantize(jnp.asarray(2 * k / 255 - 1, jnp.float32)[:, None], jax.random.key(3))
    assert np.all(np.floor((np.asarray(xq) + 1) * 128)[:, 0] == k)          # each value stays in its own bin
    bpd = np.asarray(bits_per_dim(-0.5 * (xq[:, 0] / s) ** 2 - math.log(s * math.sqrt(2 * math.pi)), 1))
    assert abs(bpd.mean() - entropy) < 3 * bpd.std() / math.sqrt(n) + 1e-3, (bpd.mean(), entropy)


def _quantized_entropy_bits(mix, k):
    """-log2 P(k) / D of 8-bit data k (n, D) from the mixture: x0 ~ p, k = clip(round((x0 + 1) 127.5), 0, 255)."""
    w, mu, s = (np.asarray(a, np.float64) for a in (mix.weights, mix.means, mix.stds))
    lo = np.where(k == 0, -np.inf, (k - 0.5) / 127.5 - 1.0)
    hi = np.where(k == 255, np.inf, (k + 0.5) / 127.5 - 1.0)
    a, b = (lo[:, None] - mu[None]) / s[None, :, None], (hi[:, None] - mu[None]) / s[None, :, None]   # (n, K, D)
    flip = a > 0                                                 # bin masses from the tail nearer to the bin
    la, lb = np.where(flip, log_ndtr(-b), log_ndtr(a)), np.where(flip, log_ndtr(-a), log_ndtr(b))
    log_mass = lb + np.log(-np.expm1(la - lb))
    return -logsumexp(np.log(w)[None] + log_mass.sum(-1), axis=1) / (k.shape[1] * math.log(2.0))


def test_8bit_bits_per_dim_ode_and_vlb_against_exact_entropy(mix, vp_exact):
    k = np.clip(np.round((np.asarray(mix.sample(jax.random.key(4), N), np.float64) + 1) * 127.5), 0, 255)
    truth = _quantized_entropy_bits(mix, k)
    x = jnp.asarray(k / 127.5 - 1.0, jnp.float32)
    logp, _ = vp_exact(dequantize(x, jax.random.key(5)))
    gap = np.asarray(bits_per_dim(logp, D), np.float64) - truth
    # an upper bound; tight (Jensen's gap of dequantization, 256 cells vs 255-spaced bins) where no coordinate
    # lies in an edge bin, whose true mass includes the mixture's tail beyond [-1, 1] (~1 bit/dim more there)
    edge = np.any((k == 0) | (k == 255), axis=1)
    assert gap.mean() > -3 * gap.std() / math.sqrt(N) and 0 < edge.sum() < N / 4, (gap.mean(), edge.sum())
    inner = gap[~edge]
    assert abs(inner.mean()) < 3 * inner.std() / math.sqrt(len(inner)) + 5e-3, (inner.mean(), inner.std())
    vlb, info = jax.jit(lambda x, key: ddpm_vlb(discrete_denoise_fn(mix, SHORT, "eps"), SHORT, x, key))(
        x, jax.random.key(6))
    vgap = np.asarray(info["bpd"], np.float64) - truth                 # an upper bound on -log2 P(k) / D
    assert vgap.mean() > 3 * vgap.std() / math.sqrt(N), (vgap.mean(), vgap.std())
    np.testing.assert_allclose(info["bpd"], vlb / (D * math.log(2.0)), rtol=1e-6)
    assert info["terms"].shape == (N, 100) and info["nfe"] == 100


# ------------------------------------------------------------------------------------------------ DDPM VLB
def test_vlb_upper_bounds_the_mixture_nll(mix):
    x = mix.sample(jax.random.key(7), 1024)
    nll = -np.asarray(mix.log_prob(x), np.float64)
    nats, _ = jax.jit(lambda x, k: ddpm_vlb(discrete_denoise_fn(mix, SHORT, "eps"), SHORT, x, k, decoder="gaussian"))(
        x, jax.random.key(8))
    gap = np.asarray(nats, np.float64) - nll        # E_data[VLB] >= cross-entropy >= entropy (Gibbs)
    assert gap.mean() > 3 * gap.std() / math.sqrt(len(gap)), (gap.mean(), gap.std())


def test_vlb_is_exact_for_gaussian_data_with_the_true_reverse_kernels():
    """Data N(mu, c^2 I): q(x_{t-1} | x_t) is Gaussian with variance beta~_t + coef1_t^2 Var(x0 | x_t),
    Var(x0 | x_t) = c^2 sigma_t^2 / (alpha_t^2 c^2 + sigma_t^2). Given as a learned variance (v channel), the model's
    reverse chain is the true one, so E[VLB] = -log p(x0) up to the prior's mismatch (~1e-5 nats)."""
    c = 0.3
    gauss = GaussianMixture.create([1.0], np.full((1, D), 0.2), c)
    eps_fn = discrete_denoise_fn(gauss, SHORT, "eps")
    alpha, sigma = np.asarray(SHORT.sqrt_alphas_cumprod, np.float64), np.asarray(SHORT.sqrt_one_minus_alphas_cumprod,
                                                                                 np.float64)
    abar_prev, beta = np.concatenate([[1.0], alpha[:-1] ** 2]), np.asarray(SHORT.betas, np.float64)
    coef1 = beta * np.sqrt(abar_prev) / sigma ** 2
    var = (1 - abar_prev) / sigma ** 2 * beta + coef1 ** 2 * c ** 2 * sigma ** 2 / (alpha ** 2 * c ** 2 + sigma ** 2)
    lo = np.log(np.concatenate([[beta[1] * (1 - alpha[0] ** 2) / sigma[1] ** 2], (1 - abar_prev[1:]) / sigma[1:] ** 2
                                * beta[1:]]))
    v = jnp.asarray(2 * (np.log(var) - lo) / (np.log(beta) - lo) - 1, jnp.float32)   # log var = lerp(lo, log beta)
    assert np.all(np.abs(v) <= 1.0 + 1e-6)

    def fn(x, t):
        return jnp.concatenate([eps_fn(x, t), jnp.broadcast_to(v[t][:, None], x.shape)], axis=-1)

    x = gauss.sample(jax.random.key(9), 2048)
    nll = -np.asarray(gauss.log_prob(x), np.float64)
    nats, _ = jax.jit(lambda x, k: ddpm_vlb(fn, SHORT, x, k, variance="learned", decoder="gaussian"))(
        x, jax.random.key(10))
    gap = np.asarray(nats, np.float64) - nll
    assert abs(gap.mean()) < 3 * gap.std() / math.sqrt(len(gap)) + 1e-3, (gap.mean(), gap.std())


# --------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call,match", [
    (lambda m: ode_log_likelihood(None, VP, jnp.zeros((2, D)), prediction="eps", trace="hutch"), "likelihood.trace"),
    (lambda m: ode_log_likelihood(None, VP, jnp.zeros((2, 300)), prediction="eps"), "max_exact_dim"),
    (lambda m: ode_log_likelihood(_vp_net(m), VP, jnp.zeros((2, D)), prediction="eps", trace="gaussian"), "key"),
    (lambda m: ode_log_likelihood(_vp_net(m), VP, jnp.zeros((2, D)), prediction="eps", t_min=0.5, t_max=0.4),
     "t_min"),
    (lambda m: ode_log_likelihood(_vp_net(m), make_schedule("linear", 10, zero_terminal_snr=True), jnp.zeros((2, D)),
                                  prediction="eps"), "t_max=8"),
    (lambda m: ode_log_likelihood(_vp_net(m), "vp", jnp.zeros((2, D)), prediction="eps"), "schedule"),
    (lambda m: ode_log_likelihood(_vp_net(m), VP, jnp.zeros((2, D)), prediction="eps", num_probes=0), "num_probes"),
    (lambda m: ddpm_vlb(None, DDPM, jnp.zeros((2, D)), jax.random.key(0), variance="big"), "likelihood.variance"),
    (lambda m: ddpm_vlb(None, DDPM, jnp.zeros((2, D)), jax.random.key(0), decoder="logistic"), "likelihood.decoder"),
    (lambda m: ddpm_vlb(None, VP, jnp.zeros((2, D)), jax.random.key(0)), r"discrete \(DDPM\) schedule")])
def test_option_errors(mix, call, match):
    with pytest.raises(ValueError, match=match):
        call(mix)


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_likelihood_writes_json(capsys, trained_workdir, tmp_path):
    out = tmp_path / "lik.json"
    code = main(["likelihood", "--workdir", trained_workdir, "--num", "3", "--batch-size", "2", "--probes", "2",
                 "--rtol", "1e-2", "--atol", "1e-2", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    res = json.loads(out.read_text())
    assert {"bpd_mean", "bpd_stderr", "bpd", "nfe_mean", "method", "split", "step", "trace", "probes"} <= set(res)
    assert res["method"] == "ode" and res["split"] == "test" and res["trace"] == "rademacher" and res["probes"] == 2
    assert res["conditioning"] == "label" and res["solver_success"] is True and res["step"] == 3
    bpd = np.asarray(res["bpd"])
    assert bpd.shape == (3,) and np.all(np.isfinite(bpd)) and np.all(bpd > 0) and res["nfe_mean"] > 0
    assert res["bpd_mean"] == pytest.approx(bpd.mean()) and res["bpd_stderr"] == pytest.approx(
        bpd.std(ddof=1) / math.sqrt(3))
    assert "bits/dim" in captured.out and f"{res['bpd_mean']:.4f}" in captured.out


@pytest.mark.parametrize("flags,match", [
    (["--method", "elbo"], "--method"), (["--trace", "exact", "--method", "vlb"], "--trace"),
    (["--trace", "hutch"], "--trace"), (["--num", "0"], "--num"), (["--probes", "0"], "--probes"),
    (["--batch-size", "0"], "--batch-size"), (["--rtol", "0"], "--rtol"), (["--split", "validation"], "--split"),
    (["--num", "100000"], "--num")])
def test_cli_likelihood_bad_flags(capsys, trained_workdir, flags, match):
    code = main(["likelihood", "--workdir", trained_workdir, "--num", "2", "--no-progress", *flags])
    assert code == 2 and match in capsys.readouterr().err
