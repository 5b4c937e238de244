"""Euler / Heun / EDM stochastic / Euler ancestral (samplers/euler.py), PNDM / PLMS (pndm.py), DDIM inversion
(inversion.py): step-for-step parity with diffusers on the exact Gaussian-mixture model, convergence orders against
the testbed's PF-ODE reference, sample quality of the stochastic sampler, jit / vmap, NFE and option errors.

Coordinates for the diffusers comparisons: its Euler / Heun / Euler-ancestral schedulers carry x_ve = y = x / alpha
(sigma_ve = s = sigma / alpha, model input scale_model_input(y) = y / sqrt(1 + s^2) = alpha y = x). We build our Grid
from *its* tables (s and t per level; alpha = 1 / sqrt(1 + s^2), sigma = s alpha), start it from y_T = x_T / alpha_0,
and compare its samples with our trajectory divided by alpha_i. PNDM and DDIM inversion work on the VP x directly
(alpha = sqrt(abar_t) from its alphas_cumprod). Both call the same JAX model with the same float32 (x, t).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import (
    assert_levels_close,
    convergence_slope,
    diffusers_loop,
    diffusers_scheduler,
    gaussian_x0_eps,
    mixture_network,
    mixture_trajectory,
    need,
    patch_randn,
    to_torch,
    torch_model,
    ve_grid,
    vp_grid,
)

from diffusion_jax.process import sde as sdes
from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.samplers.ddim import ddim
from diffusion_jax.samplers.euler import edm_sampler, euler, euler_ancestral, heun, interpolated_level
from diffusion_jax.samplers.grid import continuous_grid, discrete_grid
from diffusion_jax.samplers.inversion import ddim_inversion
from diffusion_jax.samplers.pndm import plms, pndm, prk_half_grid
from diffusion_jax.samplers.wrapper import make_denoiser
from diffusion_jax.testbed import (
    GaussianMixture,
    discrete_denoise_fn,
    edm_denoiser,
    gaussian_w2,
    mixture_mmd2,
    reference_ode_solution,
)

T, D, B = 1000, 8, 16
MIX = GaussianMixture.random(jax.random.key(0), num_components=6, dim=D)
SCHED = {name: make_schedule(name, T) for name in ("linear", "scaled_linear")}
X_T = jax.random.normal(jax.random.key(1), (B, D))
KEY = jax.random.key(7)


# ------------------------------------------------------------------------------------------------ helpers
def _ours(fn, pred, name, grid, x, key=None, half=None, **kw):
    """Our trajectory (K + 1, N, D) of solver fn from x on the exact mixture network (one compilation per solver)."""
    extra = {"half_grid": half} if half is not None else {}
    return np.asarray(mixture_trajectory(fn, pred, **kw)(MIX, SCHED[name], grid, x, key, extra))


def _torch_model(pred, name):
    """The same exact mixture network for diffusers' loop (one compilation per pred)."""
    return torch_model(functools.partial(mixture_network(pred), MIX, SCHED[name]))


# ------------------------------------------------------------------------------------ parity with diffusers
# Tolerances (float32, relative to max|x| per level). Euler / Heun / DDIM inversion: 1e-5 (measured <= 4e-6).
# Euler ancestral and PNDM: 5e-5 (measured <= 3.6e-5): these runs sit at the float32 noise floor of the problem,
# not of either code: against a float64 run of the same algorithm diffusers' own float32 PLMS is off by 3.5e-5 and
# ours by 2.1e-5 (a 1e-7 relative change of x_T moves diffusers' result by 2.2e-5).
@pytest.mark.torch
@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_euler_and_heun_match_diffusers(name, pred):
    diffusers = need("diffusers")

    model, K = _torch_model(pred, name), 12
    configs = [{"timestep_spacing": s} for s in ("leading", "trailing", "linspace")] + [{"use_karras_sigmas": True}]
    for cls, fn in ((diffusers.EulerDiscreteScheduler, euler), (diffusers.HeunDiscreteScheduler, heun)):
        for kw in configs:
            sch = diffusers_scheduler(cls, name, pred, steps=K, **kw)
            s, ts = sch.sigmas.numpy(), sch.timesteps.numpy()
            if fn is heun:      # diffusers repeats every level after the first: [s0, s1, s1, ..., s_{K-1}, s_{K-1}, 0]
                s, ts = np.concatenate([s[:1], s[1::2]]), np.concatenate([ts[:1], ts[1::2]])
            grid = ve_grid(s, ts)
            y = to_torch(np.asarray(X_T) / np.asarray(grid.alpha[0]))
            # skip Heun's predictors: keep the states after its corrector (and the last, a plain Euler step)
            keep = None if fn is euler else lambda j, sch=sch: sch.state_in_first_order or j == len(sch.timesteps) - 1
            ref = diffusers_loop(sch, model, y, scale_input=True, keep=keep)
            ours = _ours(fn, pred, name, grid, X_T) / np.asarray(grid.alpha)[:, None, None]
            assert_levels_close(ours, np.stack(ref), 1e-5, f"{fn.__name__} {kw}")


@pytest.mark.torch
@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_euler_ancestral_matches_diffusers(name, pred, monkeypatch):
    diffusers = need("diffusers")
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as module

    model, K = _torch_model(pred, name), 12
    for spacing in ("leading", "trailing", "linspace"):
        patch_randn(monkeypatch, module, KEY)    # step i draws from fold_in(KEY, i), as ours
        sch = diffusers_scheduler(diffusers.EulerAncestralDiscreteScheduler, name, pred, steps=K,
                                  timestep_spacing=spacing)
        grid = ve_grid(sch.sigmas.numpy(), sch.timesteps.numpy())
        y = to_torch(np.asarray(X_T) / np.asarray(grid.alpha[0]))
        ref = diffusers_loop(sch, model, y, scale_input=True)
        ours = _ours(euler_ancestral, pred, name, grid, X_T, KEY) / np.asarray(grid.alpha)[:, None, None]
        assert_levels_close(ours, np.stack(ref), 5e-5, f"euler_ancestral {spacing}")


@pytest.mark.torch
@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_pndm_matches_diffusers(name):
    """PLMS (skip_prk_steps=True) and full PNDM (PRK warm-up). diffusers steps by T // N: only leading (any
    steps_offset) and trailing keep the visited timesteps on that stride (its linspace does not), so those two."""
    diffusers = need("diffusers")

    model, K = _torch_model("eps", name), 10
    for spacing, offset in (("leading", 0), ("leading", 1), ("trailing", 0)):
        for prk in (False, True):
            sch = diffusers_scheduler(diffusers.PNDMScheduler, name, "eps", steps=K, timestep_spacing=spacing,
                                      steps_offset=offset, skip_prk_steps=not prk)
            abar = sch.alphas_cumprod.numpy().astype(np.float64)
            ts = np.sort(np.asarray(sch._timesteps, np.int64))[::-1]
            grid = vp_grid(abar, ts, float(sch.final_alpha_cumprod))     # final level abar_0 (set_alpha_to_one=False)
            outs = diffusers_loop(sch, model, to_torch(X_T))[1:]
            # PLMS: output 0 is the first step's predictor; PRK: every 4th output of the 12 warm-up calls is a level
            levels = outs[3:12:4] + outs[12:] if prk else outs[1:]
            half = prk_half_grid(type("S", (), {"alphas_cumprod": abar}), grid) if prk else None
            ours = _ours(pndm, "eps", name, grid, X_T, half=half, warmup="prk" if prk else "plms")
            assert_levels_close(ours, np.stack([np.asarray(X_T)] + levels), 5e-5, f"pndm prk={prk} {spacing}+{offset}")


@pytest.mark.torch
@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_ddim_inversion_matches_diffusers(name, pred):
    diffusers = need("diffusers")

    model, K = _torch_model(pred, name), 20
    x0 = MIX.sample(jax.random.key(5), B)
    for spacing in ("leading", "trailing"):
        sch = diffusers_scheduler(diffusers.DDIMInverseScheduler, name, pred, steps=K, timestep_spacing=spacing,
                                  clip_sample=False)
        ts = sch.timesteps.numpy()[::-1]
        grid = vp_grid(sch.alphas_cumprod.numpy().astype(np.float64), ts, 1.0)   # set_alpha_to_one: clean start
        ref = diffusers_loop(sch, model, to_torch(x0))
        assert_levels_close(_ours(ddim_inversion, pred, name, grid, x0), np.stack(ref), 1e-5, f"inversion {spacing}")


# ---------------------------------------------------------------------------------------- convergence
def test_convergence_orders():
    """Terminal RMS error against the float64 PF-ODE reference (Dopri8, rtol 1e-8) on the linear VP schedule, Karras
    steps (rho = 7) ending at sigma_min (final="last": a jump to sigma = 0 has a fixed size, whatever K, and its
    first-order error would put a floor under Heun). Slopes fitted over 20, 40, 80 steps (10 is pre-asymptotic):
    Euler 1 +- 0.2, Heun 2 +- 0.25 (measured 1.11 and 2.11, PLMS 2.56; Heun's error at 80 steps, 5e-4, is ~50x the
    float32 floor).
    One compilation per solver: coarser grids are padded to 80 steps by repeating the last level (zero-length
    steps leave y unchanged)."""
    sched, steps, K = SCHED["linear"], (10, 20, 40, 80), 80
    den = make_denoiser(discrete_denoise_fn(MIX, sched, "eps"), "eps")
    x_T = jax.random.normal(jax.random.key(2), (32, D))
    g = discrete_grid(sched, K, "karras", final="last")
    ref = reference_ode_solution(MIX, x_T, float(g.sigma[0]), float(g.sigma[-1]), alpha_from=float(g.alpha[0]),
                                 alpha_to=float(g.alpha[-1]), rtol=1e-8, atol=1e-8)

    def padded(n):
        g = discrete_grid(sched, n, "karras", final="last")
        return jax.tree.map(lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], K - n)]), g)

    errs = {}
    for fn in (euler, heun, plms):
        run = jax.jit(lambda grid, x, fn=fn: fn(den, grid, x)[0])
        errs[fn.__name__] = np.array([np.sqrt(np.mean((np.asarray(run(padded(n), x_T), np.float64) - ref) ** 2))
                                      for n in steps])
    slope = {k: convergence_slope(steps[1:], e[1:]) for k, e in errs.items()}
    assert abs(slope["euler"] - 1.0) < 0.2, (slope, errs)
    assert abs(slope["heun"] - 2.0) < 0.25, (slope, errs)
    # PLMS: Adams-Bashforth weights for equal steps on Karras' unequal ones; at least second order here (~2.6)
    assert slope["plms"] > 1.7 and np.all(np.diff(errs["plms"]) < 0), (slope, errs)
    assert errs["heun"][-1] < errs["euler"][-1] / 5


def test_ddim_inversion_roundtrip():
    """Invert data x0 to x_T, then DDIM (eta = 0) back with the same steps: the PF-ODE map and its inverse,
    discretized, so the error is O(1 / steps) (measured RMS 2.2e-3 at 1000 steps; the data spread is ~0.5)."""
    sched = SCHED["linear"]
    fn = discrete_denoise_fn(MIX, sched, "eps")
    den = make_denoiser(fn, "eps")
    x0 = MIX.sample(jax.random.key(5), 64)

    @functools.lru_cache(maxsize=None)
    def sample(steps):
        return jax.jit(lambda x: ddim(den, discrete_grid(sched, steps, "leading"), x)[0])

    def roundtrip(steps, model_time="next"):
        grid = discrete_grid(sched, steps, "leading")
        x_T = jax.jit(lambda g, x: ddim_inversion(den, g, x, model_time=model_time)[0])(grid, x0)
        x = sample(steps)(x_T)
        return float(jnp.sqrt(jnp.mean((x - x0) ** 2))), float(jnp.std(x_T))

    (e100, _), (e1000, std) = roundtrip(100), roundtrip(1000)
    assert e1000 < 3e-3 and e100 > 5 * e1000, (e100, e1000)
    assert abs(std - 1.0) < 0.1                                   # x_T looks like N(0, I)
    assert roundtrip(1000, "current")[0] < 5e-3


# --------------------------------------------------------------------------------------- EDM stochastic
def test_edm_stochastic_sampler_samples_the_mixture():
    """EDM Alg. 2 with S_churn = 40 (S_tmin 0.05, S_tmax 50, S_noise 1.003 as EDM's ImageNet setting) on the EDM
    schedule with its denoiser D(x; sigma): MMD^2 and W2 fall with the steps; at 64 steps MMD^2 is within noise."""
    den = make_denoiser(lambda x, s: edm_denoiser(MIX)(x, s), "edm")
    x_T = 80.0 * jax.random.normal(jax.random.key(4), (1000, D))
    opts = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    run = jax.jit(lambda g, x, k: edm_sampler(den, g, x, k, **opts)[0])
    mmd, w2, se = [], [], []
    for n in (8, 16, 64):
        x = run(continuous_grid(sdes.EDMSchedule(), n, "karras"), x_T, KEY)
        m, s = mixture_mmd2(MIX, x, 0.5, return_stderr=True)
        mmd.append(m), se.append(s), w2.append(gaussian_w2(MIX, x))
    assert mmd[0] > mmd[1] + 10 * se[1] and mmd[1] > mmd[2] + 4 * se[2], (mmd, se)
    assert abs(mmd[2]) < 4.5 * se[2], (mmd, se)
    assert w2[0] > 10 * w2[1] and w2[1] > 2 * w2[2] and w2[2] < 5e-3, w2


def test_churn_on_a_vp_grid_and_its_default_level():
    """On a discrete VP grid the churned level comes from `interpolated_level`, exact at the grid's own levels; with
    churn the sampler still samples the mixture."""
    sched = SCHED["linear"]
    den = make_denoiser(discrete_denoise_fn(MIX, sched, "eps"), "eps")
    grid = discrete_grid(sched, 32, "karras")
    t, a, s = interpolated_level(grid)(grid.sigma_ve[:-1])
    for u, v in ((t, grid.t), (a, grid.alpha), (s, grid.sigma)):
        np.testing.assert_allclose(u, v[:-1], rtol=2e-5)
    x_T = jax.random.normal(jax.random.key(4), (1000, D))
    x = jax.jit(lambda x, k: edm_sampler(den, grid, x, k, s_churn=40.0, s_tmin=0.05, s_tmax=50.0)[0])(x_T, KEY)
    m, se = mixture_mmd2(MIX, x, 0.5, return_stderr=True)
    assert m < 2e-3 and abs(m) < 10 * se + 1e-3, (m, se)


# ------------------------------------------------------------------------------ jit, vmap, NFE, errors
# Structural checks use the exact denoiser of N(MU, S^2 I) data (compiles ~5x faster than the mixture's):
# E[eps | x] = sigma (x - alpha MU) / (alpha^2 S^2 + sigma^2).
def _gaussian_denoiser(sched):

    def fn(x, t):
        alpha, sigma = sched.interpolated_level(t)
        return gaussian_x0_eps(x, alpha[:, None], sigma[:, None])[1]
    return make_denoiser(fn, "eps")


def _counting(den, counter):
    """The denoiser, counting its executed calls (a host callback runs only in the branch lax.cond takes)."""
    def counted(x, t, alpha, sigma):
        jax.debug.callback(lambda: counter.append(1))
        return den(x, t, alpha, sigma)
    return counted


def _nfe(fn, den, grid, x, **kw):
    """info["nfe"] without compiling (it is a Python int fixed at trace time)."""
    out = {}
    jax.eval_shape(lambda x: out.update(nfe=fn(den, grid, x, KEY, **kw)[1]["nfe"]), x)
    return out["nfe"]


def test_nfe_counts_executed_calls_and_jit_matches_eager():
    sched = SCHED["scaled_linear"]
    den = _gaussian_denoiser(sched)
    grid, lead, x = discrete_grid(sched, 6, "karras"), discrete_grid(sched, 6, "leading"), X_T[:4]
    K = grid.num_steps
    half = prk_half_grid(sched, lead)
    cases = [(heun, grid, {}, 2 * K - 1), (edm_sampler, grid, {"s_churn": 10.0}, 2 * K - 1),
             (pndm, lead, {"warmup": "prk", "half_grid": half}, K + 9), (plms, grid, {}, K + 1),
             (ddim_inversion, grid, {"model_time": "current"}, K - 1)]
    for fn, g, kw, expected in cases:      # executed calls (eager), reported NFE, trajectory; jit == eager
        calls = []
        eager, info = fn(_counting(den, calls), g, x, KEY, return_trajectory=True, **kw)
        jax.effects_barrier()
        assert info["nfe"] == len(calls) == expected, (fn.__name__, info["nfe"], len(calls), expected)
        assert info["trajectory"].shape == (K + 1,) + x.shape
        np.testing.assert_allclose(info["trajectory"][-1], eager)
        if fn not in (heun, plms):         # same code paths as edm_sampler / pndm: spare two compilations
            jitted = jax.jit(lambda g, x, k, fn=fn, kw=kw: fn(den, g, x, k, **kw)[0])(g, x, KEY)
            np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5, err_msg=fn.__name__)
    for fn, kw, expected in ((euler, {}, K), (euler_ancestral, {}, K), (ddim_inversion, {}, K), (plms, {}, K + 1)):
        assert _nfe(fn, den, grid, x, **kw) == expected, fn.__name__
    last = discrete_grid(sched, 6, "karras", final="last")     # ends at a noisy level: Heun corrects every step
    assert _nfe(heun, den, last, x) == 2 * last.num_steps
    assert _nfe(plms, den, discrete_grid(sched, 1, "leading"), x) == 1   # K = 1: one DDIM step, as diffusers


def test_vmap_over_keys_and_churn_window():
    sched = SCHED["linear"]
    den = _gaussian_denoiser(sched)
    grid, x = discrete_grid(sched, 6, "karras"), X_T[:4]
    keys = jax.random.split(KEY, 3)
    for fn, kw in ((edm_sampler, {"s_churn": 10.0}), (euler_ancestral, {"eta": 0.5, "s_noise": 0.9})):
        single = jax.jit(lambda k, fn=fn, kw=kw: fn(den, grid, x, k, **kw)[0])
        batched = jax.jit(jax.vmap(single))(keys)
        for k, row in zip(keys, batched):
            np.testing.assert_allclose(row, single(k), rtol=1e-5, atol=1e-5)
        assert not np.allclose(batched[0], batched[1])
    # a churn window excluding every level: Alg. 2 is Alg. 1
    off = edm_sampler(den, grid, x, KEY, s_churn=40.0, s_tmin=1e4)[0]
    np.testing.assert_allclose(off, heun(den, grid, x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn,kw,match", [
    (edm_sampler, {"s_churn": -1.0}, "sampler.s_churn"),
    (edm_sampler, {"s_noise": float("nan")}, "sampler.s_noise"),
    (edm_sampler, {"s_tmin": "0"}, "sampler.s_tmin"),
    (edm_sampler, {"second_order": 1}, "sampler.second_order"),
    (edm_sampler, {"s_churn": 1.0, "level_of_s": 3}, "sampler.level_of_s"),
    (euler_ancestral, {"eta": -0.5}, "sampler.eta"),
    (pndm, {"warmup": "rk4"}, "sampler.warmup"),
    (pndm, {"warmup": "prk"}, "sampler.half_grid"),
    (ddim_inversion, {"model_time": "previous"}, "sampler.model_time"),
])
def test_bad_options_raise(fn, kw, match):
    grid = discrete_grid(SCHED["linear"], 5, "leading")
    with pytest.raises(ValueError, match=match):
        fn(_gaussian_denoiser(SCHED["linear"]), grid, X_T, KEY, **kw)


def test_missing_key_short_grid_and_bad_grid():
    sched = SCHED["linear"]
    den = _gaussian_denoiser(sched)
    grid = discrete_grid(sched, 3, "leading")
    for fn, kw in ((edm_sampler, {"s_churn": 1.0}), (euler_ancestral, {})):
        with pytest.raises(ValueError, match="sampler.key"):
            fn(den, grid, X_T, None, **kw)
    jax.eval_shape(lambda x: euler_ancestral(den, grid, x, None, eta=0.0)[0], X_T)   # eta = 0: no noise, no key
    with pytest.raises(ValueError, match="sampler.steps"):
        pndm(den, grid, X_T, warmup="prk", half_grid=grid)
    with pytest.raises(ValueError, match="grid"):
        euler(den, (grid.t, grid.alpha, grid.sigma), X_T)
