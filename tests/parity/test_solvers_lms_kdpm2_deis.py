"""LMS (samplers/lms.py), KDPM2 and KDPM2 ancestral (kdpm2.py), DEIS (deis.py): step-for-step parity with diffusers'
LMSDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler and DEISMultistepScheduler on the exact
Gaussian-mixture model, convergence orders against the testbed's float64 PF-ODE reference, clean end, NFE, options.

Coordinates: diffusers' LMS and KDPM2 schedulers carry x_ve = y = x / alpha (sigma_ve = s = sigma / alpha); we build
our Grid from *their* levels (alpha = 1 / sqrt(1 + s^2), sigma = s alpha), start from y_T = x_T / alpha_0 and compare
with our trajectory divided by alpha_i. DEIS carries the VP x, as ours. KDPM2 interleaves its calls (midpoint, then
the full step): we keep its states after full steps and the last (a plain Euler step to sigma = 0).
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
    mixture_network,
    mixture_trajectory,
    need,
    patch_randn,
    to_torch,
    torch_model,
    ve_grid,
)

from diffusion_jax.process import sde as sdes
from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.samplers.deis import deis
from diffusion_jax.samplers.euler import interpolated_level
from diffusion_jax.samplers.grid import Grid, continuous_grid, discrete_grid
from diffusion_jax.samplers.kdpm2 import (
    kdpm2,
    kdpm2_ancestral,
    kdpm2_ancestral_options,
    kdpm2_half_grid,
    kdpm2_options,
)
from diffusion_jax.samplers.lms import lms
from diffusion_jax.samplers.wrapper import make_denoiser
from diffusion_jax.testbed import (
    GaussianMixture,
    discrete_denoise_fn,
    reference_ode_solution,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # diffusers DEIS: np.log on tensors, 6e4 per run
T, B, D = 1000, 4, 8
MIX = GaussianMixture.random(jax.random.key(0), 4, D)
X_T = jax.random.normal(jax.random.key(1), (B, D))
KEY = jax.random.key(2)
SCHED = {name: make_schedule(name, T) for name in ("linear", "scaled_linear")}
CASES = [("linear", "eps"), ("scaled_linear", "v")]
SPACINGS = [{"timestep_spacing": s} for s in ("linspace", "leading", "trailing")] + [{"use_karras_sigmas": True}]
# per level max |ours - diffusers| / max |diffusers|, float32 (measured <= 5e-6; DEIS order 3: see test_deis_float32)
PARITY_RTOL = 2e-5


def _ours(solver, pred, name, grid, key=None, half=None, **opts):
    """Our trajectory (K + 1, B, D) from X_T on the exact mixture network (one compilation per solver options)."""
    extra = {} if half is None else {"half_grid": half}
    return np.asarray(mixture_trajectory(solver, pred, **opts)(MIX, SCHED[name], grid, X_T, key, extra))


def _model(pred, name):
    return torch_model(functools.partial(mixture_network(pred), MIX, SCHED[name]))


def _levels(s, t) -> Grid:
    """A Grid of levels s = sigma_ve (no clean end appended), float64 -> float32."""
    s = np.asarray(s, np.float64)
    a = 1.0 / np.sqrt(1.0 + s ** 2)
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float64), jnp.float32)
    return Grid(t=f32(t), alpha=f32(a), sigma=f32(s * a))


def _y_T(grid):
    return to_torch(np.asarray(X_T) / np.asarray(grid.alpha[0]))


def _over_alpha(traj, grid):
    return traj / np.asarray(grid.alpha)[:, None, None]


# ------------------------------------------------------------------------------------ parity with diffusers
@pytest.mark.torch
@pytest.mark.parametrize("name, pred", CASES)
def test_lms_matches_diffusers(name, pred):
    diffusers = need("diffusers")
    model, K = _model(pred, name), 10
    for order in (1, 2, 3, 4):
        for kw in SPACINGS:
            sch = diffusers_scheduler(diffusers.LMSDiscreteScheduler, name, pred, steps=K, **kw)
            grid = ve_grid(sch.sigmas, sch.timesteps)
            by_order = lambda i, t, order=order: {"order": order}            # LMS takes its order per step
            ref = diffusers_loop(sch, model, _y_T(grid), scale_input=True, step_kwargs=by_order)
            ours = _over_alpha(_ours(lms, pred, name, grid, order=order), grid)
            assert_levels_close(ours, np.stack(ref), PARITY_RTOL, f"lms order {order} {kw}")


def _kdpm2_levels(sch, ancestral: bool):
    """diffusers' interleaved tables -> (grid, its midpoints): level j is sigmas[2j], timesteps[2j]; the midpoint of
    step j is call 2j + 1, at timesteps[2j + 1] and sigmas_interpol[2j + 1] (KDPM2) or [2j] (ancestral). The step to
    sigma = 0 has none: its start level stands in (unused)."""
    s, ts, s_int = sch.sigmas.numpy()[0::2], sch.timesteps.numpy(), sch.sigmas_interpol.numpy()
    K = len(s) - 1
    s_mid = (s_int[0::2] if ancestral else s_int[1::2])[:K - 1]
    grid = ve_grid(s, ts[0::2])
    return grid, _levels(np.append(s_mid, s[K - 1]), np.append(ts[1::2], ts[-1]))


@pytest.mark.torch
@pytest.mark.parametrize("name, pred", CASES)
@pytest.mark.parametrize("ancestral", [False, True])
def test_kdpm2_matches_diffusers(name, pred, ancestral, monkeypatch):
    """Also our own midpoints (kdpm2_half_grid, as the registry's from_process computes them) against diffusers':
    t to 1e-3 (measured 2e-4: its float32 log-sigma table), s to 5e-5 (ancestral: its float32 s_down is off by up to
    2.3e-5, which moves its trajectory by up to 3.1e-5 from ours on exact midpoints: there 5e-5)."""
    diffusers = need("diffusers")
    from diffusers.schedulers import scheduling_k_dpm_2_ancestral_discrete as module

    cls = diffusers.KDPM2AncestralDiscreteScheduler if ancestral else diffusers.KDPM2DiscreteScheduler
    fn, options = (kdpm2_ancestral, kdpm2_ancestral_options) if ancestral else (kdpm2, kdpm2_options)
    model, K = _model(pred, name), 10
    for kw in (SPACINGS[0], SPACINGS[1], SPACINGS[3]):
        patch_randn(monkeypatch, module, KEY, max_calls=K - 1)    # full step j draws fold_in(KEY, j), as ours
        sch = diffusers_scheduler(cls, name, pred, steps=K, **kw)
        grid, half = _kdpm2_levels(sch, ancestral)
        keep = lambda j, sch=sch: sch.state_in_first_order or j == len(sch.timesteps) - 1
        ref = np.stack(diffusers_loop(sch, model, _y_T(grid), scale_input=True, keep=keep))
        assert ref.shape == (K + 1, B, D)
        ours = _over_alpha(_ours(fn, pred, name, grid, KEY, half), grid)
        assert_levels_close(ours, ref, PARITY_RTOL, f"{fn.__name__} {kw}")
        own = options(SCHED[name], grid)["half_grid"]
        np.testing.assert_allclose(own.t[:-1], half.t[:-1], rtol=0, atol=1e-3)
        np.testing.assert_allclose((own.sigma / own.alpha)[:-1], (half.sigma / half.alpha)[:-1], rtol=5e-5)
        ours = _over_alpha(_ours(fn, pred, name, grid, KEY, own), grid)
        assert_levels_close(ours, ref, 5e-5 if ancestral else PARITY_RTOL, f"{fn.__name__} {kw}, kdpm2_half_grid")


# DEIS order 3 extrapolates with large alternating coefficients: diffusers' float32 run deviates from a float64 run
# of the same algorithm by up to 2.4e-5 (ours <= 7e-6: test_deis_float32), so ours and its differ by up to 3e-5.
@pytest.mark.torch
@pytest.mark.parametrize("name, pred", CASES)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(name, pred, order):
    diffusers = need("diffusers")
    model = _model(pred, name)
    for lower_order_final in (True, False):
        for K, kw in zip((10, 10, 16, 10), SPACINGS):                # K = 16: lower_order_final is off (K >= 15)
            if K >= 15 and not lower_order_final:
                continue
            sch = diffusers_scheduler(diffusers.DEISMultistepScheduler, name, pred, steps=K, solver_order=order,
                                      lower_order_final=lower_order_final, **kw)
            grid = ve_grid(sch.sigmas, sch.timesteps, torch_float32=True)   # ends at t = 0 (or repeats s_min)
            ref = np.stack(diffusers_loop(sch, model, to_torch(X_T)))
            ours = _ours(deis, pred, name, grid, order=order, lower_order_final=lower_order_final)
            rtol = PARITY_RTOL if order < 3 else 5e-5
            assert_levels_close(ours, ref, rtol, f"deis {order} lower_order_final={lower_order_final} {kw}")


@pytest.mark.torch
def test_deis_float32():
    """Our float32 DEIS-3 on diffusers' trailing grid stays within 1e-5 of a float64 run of it (measured 6e-6; the
    Gauss-Legendre coefficients: with the antiderivative differences diffusers uses, 3.5e-5)."""
    diffusers = need("diffusers")
    sch = diffusers_scheduler(diffusers.DEISMultistepScheduler, "linear", "eps", steps=16, solver_order=3,
                              timestep_spacing="trailing")
    grid = ve_grid(sch.sigmas, sch.timesteps, torch_float32=True)
    x32 = _ours(deis, "eps", "linear", grid, order=3)
    with jax.enable_x64(True):
        f64 = lambda tree: jax.tree.map(lambda v: jnp.asarray(np.asarray(v), jnp.float64), tree)
        den = make_denoiser(discrete_denoise_fn(MIX.astype(jnp.float64), f64(SCHED["linear"]), "eps"), "eps")
        x64 = deis(den, f64(grid), f64(X_T), order=3, return_trajectory=True)[1]["trajectory"]
        assert_levels_close(x32, np.asarray(x64), 1e-5, "deis order 3, float32 vs float64")


# ---------------------------------------------------------------------------------------------- convergence
def _lam_grid(K, lo=-3.0, hi=3.0):
    """Uniform in lambda on a VP path (float64), stopping at lambda = hi (no jump to sigma = 0)."""
    lam = np.linspace(lo, hi, K + 1)
    a, s = np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))
    return Grid(t=jnp.asarray(lam), alpha=jnp.asarray(a), sigma=jnp.asarray(s))


def test_convergence_orders():
    """Terminal RMS error against the float64 PF-ODE reference on a smooth mixture (stds 0.3), lambda in [-3, 3],
    fitted over 48, 96, 192 steps (float64). Measured slopes: LMS-1 0.99, LMS-4 3.5 (-> 4: its warm-up steps are of
    order 1-3), DEIS-3 2.8, KDPM2 1.97 (midpoints interpolated between the grid's levels: no half_grid). One
    compilation per solver: coarser grids are padded to 192 steps by repeating the last level (zero-length steps)."""
    mix = GaussianMixture.random(jax.random.key(0), 4, D, std=0.3)
    steps = [48, 96, 192]
    with jax.enable_x64(True):
        m64 = mix.astype(jnp.float64)
        g = _lam_grid(1)
        a0, s0, aK, sK = (float(v) for v in (g.alpha[0], g.sigma[0], g.alpha[1], g.sigma[1]))
        x_T = a0 * m64.sample(jax.random.key(3), 32) + s0 * jax.random.normal(jax.random.key(4), (32, D), jnp.float64)
        ref = reference_ode_solution(mix, x_T, s0, sK, alpha_from=a0, alpha_to=aK)
        den = lambda x, t, a, s: (m64.x0_mean(x, a, s), m64.eps_mean(x, a, s))
        padded = lambda K: jax.tree.map(lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], steps[-1] - K)]), _lam_grid(K))
        errs, slope = {}, {}
        for label, fn, kw in (("lms1", lms, {"order": 1}), ("lms4", lms, {"order": 4}),
                              ("deis3", deis, {"order": 3, "lower_order_final": False}), ("kdpm2", kdpm2, {})):
            run = jax.jit(lambda grid, fn=fn, kw=kw: fn(den, grid, x_T, **kw)[0])
            errs[label] = [float(np.sqrt(np.mean((np.asarray(run(padded(K))) - ref) ** 2))) for K in steps]
            slope[label] = convergence_slope(steps, errs[label])
    assert abs(slope["lms1"] - 1.0) < 0.15, (slope, errs)
    assert slope["lms4"] > 3.2 and errs["lms4"][-1] < errs["lms1"][-1] / 300, (slope, errs)
    assert slope["deis3"] > 2.5 and slope["kdpm2"] > 1.8, (slope, errs)


# ------------------------------------------------------------------------- clean end, NFE, jit, grad, options
def _counting(den, calls):
    def counted(x, t, alpha, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return den(x, t, alpha, sigma)
    return counted


@pytest.mark.parametrize("fn, kw, nfe, ends_at_x0", [
    (lms, {"order": 4}, lambda K: K, False), (deis, {"order": 3, "lower_order_final": False}, lambda K: K, True),
    (kdpm2, {}, lambda K: 2 * K - 1, True), (kdpm2_ancestral, {}, lambda K: 2 * K - 1, True)])
def test_clean_end_nfe_and_grad(fn, kw, nfe, ends_at_x0):
    """On a final="zero" grid the denoiser is never called at sigma = 0 (executed calls = reported NFE); DEIS of
    any order and KDPM2 (a plain Euler step) end at x0_hat of the last noisy level; jit(grad) is finite."""
    sched = SCHED["linear"]
    den = make_denoiser(discrete_denoise_fn(MIX, sched, "eps"), "eps")
    grid = discrete_grid(sched, 6, "karras")
    K = grid.num_steps
    if fn in (kdpm2, kdpm2_ancestral):
        kw = {**kw, **(kdpm2_options if fn is kdpm2 else kdpm2_ancestral_options)(sched, grid)}
    calls = []
    x, info = fn(_counting(den, calls), grid, X_T, KEY, return_trajectory=True, **kw)
    jax.effects_barrier()
    assert info["nfe"] == len(calls) == nfe(K) and info["trajectory"].shape == (K + 1, B, D)
    np.testing.assert_array_equal(info["trajectory"][-1], x)
    if ends_at_x0:
        np.testing.assert_allclose(x, den(info["trajectory"][-2], grid.t[-2], grid.alpha[-2], grid.sigma[-2])[0],
                                   atol=2e-6)
    grad = jax.jit(jax.grad(lambda x_T, g: jnp.sum(fn(den, g, x_T, KEY, **kw)[0])))(X_T, grid)
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_kdpm2_midpoints():
    """kdpm2_half_grid: s_mid = sqrt(s_i s_{i+1}) on discrete and continuous processes (the schedule's own alpha on
    a continuous one), the step to 0 keeps its start level; the from_process helpers refuse a traced grid (None);
    half_grid=None interpolates the midpoints between the grid's levels (`euler.interpolated_level`)."""
    sched = SCHED["scaled_linear"]
    grid = discrete_grid(sched, 8, "karras")
    for process, g in ((sched, grid), (sdes.VPSDE(), continuous_grid(sdes.VPSDE(), 8, "uniform"))):
        s = np.asarray(g.sigma_ve, np.float64)
        half = kdpm2_half_grid(process, g)
        np.testing.assert_allclose((half.sigma / half.alpha)[:-1], np.sqrt(s[:-2] * s[1:-1]), rtol=2e-5)
        np.testing.assert_array_equal(half.t[-1], g.t[-2])
    for options in (kdpm2_options, kdpm2_ancestral_options):
        with pytest.raises(ValueError, match="concrete grid"):
            options(sched, None)
    den = make_denoiser(discrete_denoise_fn(MIX, sched, "eps"), "eps")
    run = jax.jit(lambda g, half: kdpm2(den, g, X_T, half_grid=half)[0])
    s = grid.sigma_ve
    t, a, sg = interpolated_level(grid)(jnp.sqrt(s[:-2] * s[1:-1]))
    half = Grid(t=jnp.append(t, grid.t[-2]), alpha=jnp.append(a, grid.alpha[-2]), sigma=jnp.append(sg, grid.sigma[-2]))
    np.testing.assert_allclose(run(grid, None), run(grid, half), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn, kw, match", [
    (lms, {"order": 5}, "sampler.order"), (lms, {"order": 2.0}, "sampler.order"), (deis, {"order": 4}, "sampler.order"),
    (deis, {"lower_order_final": 1}, "sampler.lower_order_final"), (lms, {"return_trajectory": 1}, "return_trajectory"),
    (kdpm2, {"half_grid": "x"}, "sampler.half_grid"), (kdpm2_ancestral, {"s_noise": -1.0}, "sampler.s_noise")])
def test_bad_options_raise(fn, kw, match):
    grid = discrete_grid(SCHED["linear"], 4, "karras")
    with pytest.raises(ValueError, match=match):
        fn(lambda x, t, a, s: (x, x), grid, X_T, KEY, **kw)


def test_kdpm2_half_grid_checks_and_missing_key():
    grid = discrete_grid(SCHED["linear"], 4, "karras")
    den = lambda x, t, a, s: (x, x)
    with pytest.raises(ValueError, match="sampler.half_grid"):
        kdpm2(den, grid, X_T, half_grid=grid)                     # K + 1 levels, not the K midpoints
    with pytest.raises(ValueError, match="ancestral=True"):        # KDPM2's midpoints, not the ancestral ones
        kdpm2_ancestral(den, grid, X_T, KEY, half_grid=kdpm2_half_grid(SCHED["linear"], grid))
    with pytest.raises(ValueError, match="sampler.key"):
        kdpm2_ancestral(den, grid, X_T, None)
