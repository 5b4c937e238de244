"""Samplers: timestep selection and single updates against diffusers, exact Gaussian denoisers, jit.

Gaussian data x0 ~ N(mu, s^2 I) has the exact denoiser E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2)
(x_t - alpha mu), so sampler outputs can be checked against closed forms: the probability-flow ODE map and
the data moments (with tolerances from the standard error of the sample moments).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import DIFFUSERS_PREDICTION, MU, S, diffusers_loop, float64_alphas_cumprod, gaussian_x0_eps, need, to_torch

from diffusion_jax.objectives.param import from_x0_eps
from diffusion_jax.process.discrete import beta_schedule, make_schedule
from diffusion_jax.samplers import discrete_grid, respace, run_sampler, select_timesteps

Z = 4.5        # two-sided tail ~7e-6 per check; keys are fixed, so the outcome is deterministic anyway
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def sched():
    return make_schedule("linear", 1000)


def ddim(fn, sched, key, shape, *, steps, eta=0.0, **kw):
    """run_sampler("ddim", ...) with DDIM's own option eta."""
    return run_sampler("ddim", fn, sched, key, shape, steps=steps, options={"eta": eta}, **kw)


def ddpm(fn, sched, key, shape, *, steps, variance="fixed_small", **kw):
    """run_sampler("ddpm", ...) with DDPM's own option variance."""
    return run_sampler("ddpm", fn, sched, key, shape, steps=steps, options={"variance": variance}, **kw)


def gaussian_denoiser(schedule, prediction):
    def fn(x, t):
        t = t.astype(jnp.int32)                                   # integer grid: DDPM timesteps
        a, sg = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        x0 = gaussian_x0_eps(x, a, sg)[0]
        return from_x0_eps(prediction, x0, (x - a * x0) / sg, a, sg)
    return fn


# ---------------------------------------------------------------------------------------------- spacing
@pytest.mark.torch
def test_select_timesteps_matches_diffusers():
    diffusers = need("diffusers")
    for T, steps in [(1000, 1), (1000, 10), (1000, 50), (1000, 61), (1000, 1000), (100, 7), (100, 29), (4000, 333)]:
        for spacing in ("leading", "trailing", "linspace"):
            ref = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
            ref.set_timesteps(steps)
            ours = select_timesteps(T, steps, spacing)
            # diffusers' "trailing" appends a spurious -1 for some (T, steps), e.g. (1000, 61), (100, 29).
            np.testing.assert_array_equal(ours, ref.timesteps.numpy()[:steps], err_msg=f"{T} {steps} {spacing}")
            assert ours.shape == (steps,) and ours.min() >= 0 and ours.max() < T and np.all(np.diff(ours) < 0)


def test_respace_full_is_identity(sched):
    tab = respace(sched, select_timesteps(1000, 1000))
    np.testing.assert_allclose(tab.beta[::-1], sched.betas, rtol=2e-6)
    np.testing.assert_allclose(tab.posterior_variance[::-1], sched.posterior_variance, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(tab.posterior_log_variance_clipped[::-1], sched.posterior_log_variance_clipped,
                               rtol=1e-5)


# -------------------------------------------------------------------------------- diffusers, step by step
C, B = 3, 8
_rng = np.random.default_rng(0)
W, W2, BIAS = _rng.normal(size=(C, C)), _rng.normal(size=(C, C)), _rng.normal(size=(C,))


def _model(x, t, abar, tanh, prediction, learned, W, W2, BIAS):
    """Exact Gaussian denoiser plus a nonlinear perturbation, written once for jax and torch."""
    a, sg = abar ** 0.5, (1 - abar) ** 0.5
    x0 = MU + a * S ** 2 / (a ** 2 * S ** 2 + sg ** 2) * (x - a * MU) + 0.2 * tanh(x @ W + BIAS * (t / 1000.0))
    eps = (x - a * x0) / sg
    out = eps if prediction == "eps" else a * eps - sg * x0
    return (out, tanh(x @ W2)) if learned else out


def _model_jax(schedule, prediction, learned=False):
    def fn(x, t):
        t = t.astype(jnp.int32)                                   # integer grid: DDPM timesteps
        out = _model(x, t[:, None], schedule.alphas_cumprod[t][:, None], jnp.tanh, prediction, learned,
                     *map(jnp.float32, (W, W2, BIAS)))
        return jnp.concatenate(out, -1) if learned else out
    return fn


def _run_diffusers(ref, schedule, steps, prediction, step_kw, learned=False):
    """Run a diffusers scheduler in float64 with the same model, x_T and per-step noise z_i as ours (run_sampler:
    x_T from fold_in(KEY, 0), step i's noise from fold_in(fold_in(KEY, 1), i)).
    step_kw(z) -> extra kwargs of ref.step; `ref.noise` holds z for a patched randn_tensor."""
    import torch
    float64_alphas_cumprod(ref, "linear")                       # float64 reference
    ref.final_alpha_cumprod = ref.one = torch.tensor(1.0, dtype=torch.float64)
    ref.set_timesteps(steps)
    as_torch = lambda a: to_torch(a, dtype=np.float64)
    model_abar = as_torch(schedule.alphas_cumprod)              # the model sees the same (float32) table

    def model(x, t):
        out = _model(x, t, model_abar[t], torch.tanh, prediction, learned, *map(as_torch, (W, W2, BIAS)))
        return torch.cat(out, 1) if learned else out

    def step_kwargs(i, t):
        ref.noise = as_torch(jax.random.normal(jax.random.fold_in(jax.random.fold_in(KEY, 1), i), (B, C)))
        return step_kw(ref.noise)

    x_T = as_torch(jax.random.normal(jax.random.fold_in(KEY, 0), (B, C)))
    return diffusers_loop(ref, model, x_T, step_kwargs=step_kwargs)[-1], ref.timesteps.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("prediction,eta", [("eps", 0.0), ("v", 0.0), ("eps", 1.0), ("v", 0.5)])
def test_ddim_matches_diffusers(sched, prediction, eta):
    diffusers = need("diffusers")
    ref = diffusers.DDIMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction])
    want, ts = _run_diffusers(ref, sched, 10, prediction, lambda z: dict(
        eta=eta, use_clipped_model_output=True, variance_noise=z if eta > 0 else None))
    got, info = jax.jit(lambda k: ddim(_model_jax(sched, prediction), sched, k, (B, C), steps=10, eta=eta,
                                       prediction=prediction, clip_denoised=1.0))(KEY)
    np.testing.assert_array_equal(np.asarray(discrete_grid(sched, 10).t[:-1]), ts)
    assert np.mean(np.abs(want) < 0.999) > 0.8          # the final x0-hat is mostly not clipped
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("prediction,variance,steps", [
    ("eps", "fixed_small", 10), ("v", "fixed_small", 10), ("eps", "fixed_large", 10), ("v", "fixed_large", 10),
    ("eps", "learned", 10), ("eps", "fixed_small", 1000)])
def test_ddpm_matches_diffusers(sched, monkeypatch, prediction, variance, steps):
    diffusers = need("diffusers")
    from diffusers.schedulers import scheduling_ddpm
    ref = diffusers.DDPMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction],
                                  variance_type="learned_range" if variance == "learned" else variance)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: ref.noise)   # our z_i, step by step
    want, ts = _run_diffusers(ref, sched, steps, prediction, lambda z: {}, learned=variance == "learned")
    got, info = jax.jit(lambda k: ddpm(_model_jax(sched, prediction, variance == "learned"), sched, k, (B, C),
                                       steps=steps, variance=variance, prediction=prediction, clip_denoised=1.0))(KEY)
    np.testing.assert_array_equal(np.asarray(discrete_grid(sched, steps).t[:-1]), ts)
    assert info["nfe"] == steps and np.mean(np.abs(want) < 0.999) > 0.5     # mostly not clipped
    # The grid holds float32 levels (alpha, sigma), so beta = sigma^2 - (alpha / alpha_next)^2 sigma_next^2 carries
    # ~1e-5 relative rounding at high noise; over 1,000 steps that is 1.7e-5 in the worst of 24 values.
    np.testing.assert_allclose(got, want, atol=1e-5 if steps <= 100 else 3e-5)


# ------------------------------------------------------------------------------- exact Gaussian denoiser
def _ode_map(sched, x_T, t):
    a, sg = float(sched.alpha(t)), float(sched.sigma(t))
    return MU + S * (np.asarray(x_T, np.float64) - a * MU) / np.sqrt(a ** 2 * S ** 2 + sg ** 2)


def test_ddim_deterministic_and_converges_to_ode_map(sched):
    errs = []
    for steps in (10, 100, 1000):
        f = jax.jit(lambda k, steps=steps: ddim(gaussian_denoiser(sched, "x0"), sched, k, (256, 4), steps=steps,
                                                prediction="x0", spacing="trailing")[0])
        x = f(KEY)
        x_T = jax.random.normal(jax.random.fold_in(KEY, 0), (256, 4))
        errs.append(np.abs(np.asarray(x, np.float64) - _ode_map(sched, x_T, 999)).max())
    np.testing.assert_array_equal(f(KEY), x)                                  # same key: bitwise equal
    assert not np.allclose(f(jax.random.key(1)), x)
    # DDIM is a first-order solver of the probability-flow ODE: error ~ 1/steps
    assert errs[0] > errs[1] > errs[2] and errs[1] / errs[2] > 5 and errs[2] < 1e-2, errs


def test_parameterizations_give_same_ddim_trajectory(sched):
    outs = {p: jax.jit(lambda k, p=p: ddim(gaussian_denoiser(sched, p), sched, k, (256, 4), steps=50,
                                           prediction=p)[0])(KEY)
            for p in ("eps", "x0", "v", "score")}
    for p in ("eps", "v", "score"):
        np.testing.assert_allclose(outs[p], outs["x0"], atol=1e-5, err_msg=p)


def _chain_moments(sched, timesteps):
    """Exact mean/std of the (linear-Gaussian) DDPM chain with the exact denoiser, x_T ~ N(0, 1), float64."""
    abar = np.cumprod(1 - beta_schedule("linear", sched.num_timesteps))
    ab = list(abar[timesteps]) + [1.0]
    m, v = 0.0, 1.0
    for j in range(len(timesteps)):
        a, ap = np.sqrt(ab[j]), np.sqrt(ab[j + 1])
        beta = 1 - ab[j] / ab[j + 1]
        k = a * S ** 2 / (ab[j] * S ** 2 + 1 - ab[j])
        c0, ct = ap * beta / (1 - ab[j]), np.sqrt(1 - beta) * (1 - ab[j + 1]) / (1 - ab[j])
        var = 0.0 if j == len(timesteps) - 1 else beta * (1 - ab[j + 1]) / (1 - ab[j])
        m, v = (c0 * k + ct) * m + c0 * (1 - k * a) * MU, (c0 * k + ct) ** 2 * v + var
    return m, np.sqrt(v)


N_STAT = (4096, 16)


def _check_moments(x, mean, std):
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    assert abs(x.mean() - mean) < Z * std / np.sqrt(n), (x.mean(), mean)
    assert abs(x.std() - std) < Z * std / np.sqrt(2 * n), (x.std(), std)


def test_ddpm_fixed_small_moments(sched):
    x, info = jax.jit(lambda k: ddpm(gaussian_denoiser(sched, "eps"), sched, k, N_STAT, steps=1000))(KEY)
    assert info["nfe"] == 1000
    mean, std = _chain_moments(sched, select_timesteps(1000, 1000))
    # beta~ ignores Var[x0 | x_t] (Ho et al.: optimal for a point mass x0), so the chain's std is slightly low.
    assert abs(mean - MU) < 1e-4 and -0.005 < std - S < 0
    _check_moments(x, mean, std)


def test_ddim_eta1_is_respaced_ddpm(sched):
    """DDIM with eta = 1 is ancestral sampling on the respaced schedule (Song et al. sec. 4.1): same key, same
    noise, same samples up to float rounding."""
    x_ddim, info = jax.jit(lambda k: ddim(gaussian_denoiser(sched, "eps"), sched, k, N_STAT, eta=1.0,
                                          steps=100))(KEY)
    x_ddpm, _ = jax.jit(lambda k: ddpm(gaussian_denoiser(sched, "eps"), sched, k, N_STAT, steps=100))(KEY)
    np.testing.assert_allclose(x_ddim, x_ddpm, atol=2e-5)
    _check_moments(x_ddim, *_chain_moments(sched, select_timesteps(1000, 100)))


def test_respaced_ddpm_with_exact_variance_matches_data(sched):
    """Learned variance set to the true reverse variance beta~'_t + c0^2 Var[x0 | x_t] of Gaussian data makes
    each respaced step the exact reverse conditional; with x_T from the exact marginal, x0 ~ N(mu, s^2)."""
    steps = 100
    ts = select_timesteps(1000, steps)
    tab = jax.tree.map(np.asarray, respace(sched, ts))
    a2, beta, pv = tab.alpha.astype(np.float64) ** 2, tab.beta, tab.posterior_variance
    c0 = tab.alpha_prev * beta / (1 - a2)
    var = pv + c0 ** 2 * S ** 2 * (1 - a2) / (a2 * S ** 2 + 1 - a2)
    frac = np.zeros(steps)       # the last step adds no noise: its value is unused
    lv, lpv, lb = np.log(var[:-1]), np.log(pv[:-1]), np.log(beta[:-1])
    frac[:-1] = (lv - lpv) / (lb - lpv)
    assert np.all((frac >= 0) & (frac <= 1))     # the true variance lies between beta~ and beta (N&D sec. 3.1)
    v_table = jnp.zeros(1000, jnp.float32).at[ts].set(2 * frac - 1)
    eps_fn = gaussian_denoiser(sched, "eps")

    def fn(x, t):
        v = v_table[t.astype(jnp.int32)][:, None]                 # integer grid: DDPM timesteps
        return jnp.concatenate([eps_fn(x, t), jnp.broadcast_to(v, x.shape)], -1)

    a_T, s_T = float(sched.alpha(ts[0])), float(sched.sigma(ts[0]))
    x_T = a_T * MU + np.sqrt(a_T ** 2 * S ** 2 + s_T ** 2) * jax.random.normal(jax.random.key(7), N_STAT)
    x, _ = jax.jit(lambda k, x_T: ddpm(fn, sched, k, N_STAT, steps=steps, variance="learned", x_T=x_T))(KEY, x_T)
    _check_moments(x, MU, S)


# ------------------------------------------------------------------------------------- jit and arguments
def test_jit_of_closure_matches_eager(sched):
    params = {"w": jnp.float32(W)}
    apply = lambda p, x, t: jnp.tanh(x @ p["w"] + t[:, None] / 1000.0)

    for name, options in [("ddim", dict(eta=0.5)), ("ddpm", dict(variance="fixed_large"))]:
        def sample(params, key):
            return run_sampler(name, lambda x, t: apply(params, x, t), sched, key, (B, C), steps=20,
                               options=options)[0]
        chex.clear_trace_counter()
        f = jax.jit(chex.assert_max_traces(n=1)(sample))
        np.testing.assert_allclose(f(params, KEY), sample(params, KEY), atol=1e-5)
        f(jax.tree.map(lambda a: a + 1, params), jax.random.key(3))   # no retrace


@pytest.mark.parametrize("name,kw,options,match", [
    ("ddim", dict(steps=0), {}, "sampler.steps"), ("ddim", dict(steps=1001), {}, "sampler.steps"),
    ("ddim", dict(steps=2.5), {}, "sampler.steps"), ("ddim", dict(steps=10), dict(eta=-0.1), "sampler.eta"),
    ("ddim", dict(steps=10, spacing="uniformly"), {}, "sampler.spacing"),
    ("ddim", dict(steps=10, prediction="noise"), {}, "sampler.prediction"),
    ("ddim", dict(steps=10, clip_denoised=0.0), {}, "sampler.clip_denoised"),
    ("ddpm", dict(steps=10), dict(variance="fixed"), "sampler.variance"),
    ("ddpm", dict(steps=-1), {}, "sampler.steps"),
    ("ddpm", dict(steps=10, prediction="eps0"), {}, "sampler.prediction")])
def test_argument_errors(sched, name, kw, options, match):
    with pytest.raises(ValueError, match=match):
        run_sampler(name, lambda x, t: x, sched, KEY, (2, 3), options=options, **kw)
