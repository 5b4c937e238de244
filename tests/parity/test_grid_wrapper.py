"""Grids (time discretizations) against diffusers, continuous schedules (sde.py), and the denoiser wrapper.

The wrapper is checked on Gaussian data x0 ~ N(mu, s^2 I), whose exact denoiser is known in closed form:
E[x0 | x] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x - alpha mu), so every parameterization of it must give
the same (x0_hat, eps_hat) at every level.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import MU, S, diffusers_scheduler, gaussian_x0_eps, need, to_torch

from diffusion_jax.process import vdm as pvdm
from diffusion_jax.objectives.param import from_x0_eps
from diffusion_jax.process import sde as sdes
from diffusion_jax.process.discrete import ContinuousSchedule, make_schedule
from diffusion_jax.samplers import respace, run_sampler, select_timesteps
from diffusion_jax.samplers.grid import SPACINGS, Grid, continuous_grid, discrete_grid
from diffusion_jax.samplers.wrapper import Guidance, batched_pair, guide, make_denoiser, ode_derivative

T = 1000
SDES = [sdes.VPSDE(), sdes.SubVPSDE(), sdes.VESDE(), sdes.EDMSchedule()]


def curved_gamma(fixed_endpoints: bool = False):
    """A learned VDM gamma far from linear: MonotoneGamma with large random weights (it stays monotone)."""
    gamma = pvdm.MonotoneGamma(n_features=64, fixed_endpoints=fixed_endpoints)
    p = gamma.init(jax.random.key(0))
    k2, k3 = jax.random.split(jax.random.key(1))
    p["l1"]["w"] = jnp.full((1, 1), 2.0)                 # a small linear part: the sigmoid features dominate
    p["l2"]["w"] = 6.0 * jax.random.normal(k2, (1, 64))
    p["l3"]["w"] = 20.0 * jax.random.normal(k3, (64, 1))
    return pvdm.VDMSchedule(gamma, p)


VDMS = [pvdm.VDMSchedule(pvdm.LinearGamma(), {}), curved_gamma()]
SCHEDULE_IDS = lambda s: type(getattr(s, "gamma", s)).__name__


@pytest.fixture(scope="module")
def sched():
    return make_schedule("linear", T)


# ------------------------------------------------------------------------------------ grids vs diffusers
def _ref(cls, name, steps, exact=True, **kw):
    """diffusers' (sigmas, timesteps) after set_timesteps(steps) on our betas. exact=True replaces its float32
    alphas_cumprod by the float64 product, so that only the algorithms are compared (with float32 cumprod its
    sigma_min = sqrt(1 - abar_0)/... carries a ~1e-4 relative error from 1 - abar_0 ~ 1e-4 in float32)."""
    ref = diffusers_scheduler(cls, name, num_timesteps=T, float64_alphas=exact, steps=steps, **kw)
    return ref.sigmas.numpy().astype(np.float64), ref.timesteps.numpy().astype(np.float64)


def _ours(grid):
    g = jax.tree.map(np.asarray, grid)
    return g.sigma / g.alpha, g.t


@pytest.mark.torch
@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
@pytest.mark.parametrize("steps", [10, 50])
def test_euler_discrete_grids_match_diffusers(name, steps):
    diffusers = need("diffusers")
    sched = make_schedule(name, T)
    for spacing in ("leading", "trailing", "linspace"):
        sig, ts = _ref(diffusers.EulerDiscreteScheduler, name, steps, timestep_spacing=spacing)
        s, t = _ours(discrete_grid(sched, steps, spacing))
        assert s.shape == sig.shape == (steps + 1,) and s[-1] == sig[-1] == 0
        if spacing == "linspace" and (T - 1) % (steps - 1):
            # Difference: Euler's "linspace" keeps fractional timesteps (and interpolates sigma linearly between
            # them); select_timesteps rounds them, as DDIMScheduler does. Equal when (T-1)/(steps-1) is an int.
            assert np.abs(t[:-1] - ts).max() <= 0.5 and np.abs(t[:-1] - np.round(ts)).max() == 0
            continue
        np.testing.assert_array_equal(t[:-1], ts, err_msg=spacing)
        np.testing.assert_allclose(s[:-1], sig[:-1], rtol=3e-7, err_msg=spacing)
    # use_karras_sigmas with the default timestep_spacing="linspace" (sigma_min/max = the schedule's):
    sig, ts = _ref(diffusers.EulerDiscreteScheduler, name, steps, use_karras_sigmas=True)
    s, t = _ours(discrete_grid(sched, steps, "karras"))
    np.testing.assert_allclose(s, sig, rtol=3e-7)
    np.testing.assert_allclose(t[:-1], ts, atol=2e-4)        # fractional timesteps by log-sigma interpolation
    assert t[0] == T - 1 and np.all(np.diff(t) < 0)
    # Without the float64 alphas_cumprod: float32 precision of diffusers' own 1 - abar, nothing more.
    sig, ts = _ref(diffusers.EulerDiscreteScheduler, name, steps, exact=False, use_karras_sigmas=True)
    np.testing.assert_allclose(s, sig, rtol=3e-4)
    np.testing.assert_allclose(t[:-1], ts, atol=2e-2)


@pytest.mark.torch
@pytest.mark.parametrize("steps", [10, 25])
def test_dpm_solver_grids_match_diffusers(sched, steps):
    diffusers = need("diffusers")
    cls = diffusers.DPMSolverMultistepScheduler
    # Default (timestep_spacing="linspace"): round(linspace(0, T-1, K+1)) without its last point t = 0, then sigma
    # = 0. That is our linspace with final="last" (K+1 levels ending at t = 0, DPM-Solver's t_0) whose last level
    # (sigma_ve(t=0) ~ 0.01) diffusers replaces by 0.
    sig, ts = _ref(cls, "linear", steps)
    s, t = _ours(discrete_grid(sched, steps, "linspace", final="last"))
    np.testing.assert_array_equal(t[:-1], ts)
    np.testing.assert_allclose(s[:-1], sig[:-1], rtol=3e-7)
    assert t[-1] == 0 and sig[-1] == 0 and s[-1] > 0
    # use_karras_sigmas / use_lu_lambdas (= our "logsnr": uniform in log sigma_ve = -lambda): same sigmas; diffusers
    # rounds the timesteps (for non-cosine schedules) while keeping the unrounded sigmas, we keep t fractional so
    # that the network time and the noise level agree.
    for spacing, kw in (("karras", {"use_karras_sigmas": True}), ("logsnr", {"use_lu_lambdas": True})):
        sig, ts = _ref(cls, "linear", steps, **kw)
        s, t = _ours(discrete_grid(sched, steps, spacing))
        np.testing.assert_allclose(s, sig, rtol=3e-7, err_msg=spacing)
        np.testing.assert_array_equal(np.round(t[:-1]), ts, err_msg=spacing)
        assert np.abs(t[:-1] - ts).max() > 0.01                 # they really are fractional


@pytest.mark.torch
def test_edm_karras_grid_matches_diffusers():
    diffusers = need("diffusers")
    ref = diffusers.EDMEulerScheduler()        # sigma_min=0.002, sigma_max=80, rho=7, final sigma 0
    ref.set_timesteps(18)
    g = continuous_grid(sdes.EDMSchedule(), 18, "karras")
    np.testing.assert_allclose(g.sigma, ref.sigmas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(jnp.log(g.t[:-1]) / 4, ref.timesteps.numpy(), rtol=1e-6)   # c_noise(t = sigma)
    np.testing.assert_array_equal(g.alpha, 1.0)


# ------------------------------------------------------------------------------------------- grid shape
def test_grid_levels_final_and_properties(sched):
    g = discrete_grid(sched, 10, "leading")
    assert g.num_steps == 10 and g.t.shape == g.alpha.shape == g.sigma.shape == (11,) and g.t.dtype == jnp.float32
    assert (g.t[-1], g.alpha[-1], g.sigma[-1]) == (-1.0, 1.0, 0.0)
    assert g.lam[-1] == jnp.inf and g.log_snr[-1] == jnp.inf and g.sigma_ve[-1] == 0
    np.testing.assert_allclose(g.log_snr[:-1], sched.log_snr(g.t[:-1].astype(jnp.int32)), rtol=1e-5)
    np.testing.assert_allclose(g.lam, g.log_snr / 2)
    # integer grids hold the schedule's tables: the respaced chain of DDPM / DDIM and RePaint (respace recomputes
    # them in float32, equal to the last bit)
    tab = respace(sched, select_timesteps(T, 10, "leading"))
    np.testing.assert_allclose(g.alpha[:-1], tab.alpha, rtol=1.2e-7)
    np.testing.assert_allclose(g.alpha[1:], tab.alpha_prev, rtol=1.2e-7)
    np.testing.assert_allclose(g.sigma[:-1], tab.sigma, rtol=1.2e-7)
    # final="last": K + 1 network levels, no clean end
    for spacing in SPACINGS:
        gl = discrete_grid(sched, 10, spacing, final="last")
        assert gl.num_steps == 10 and gl.sigma[-1] > 0 and np.all(np.diff(np.asarray(gl.sigma_ve)) < 0), spacing
        gz = discrete_grid(sched, 10, spacing)
        assert gz.num_steps == 10 and gz.sigma[-1] == 0 and np.all(np.diff(np.asarray(gz.sigma_ve)) < 0), spacing
    # a Grid is a pytree: one compiled function serves every grid of the same K
    traces = []

    @jax.jit
    def total(grid):
        traces.append(1)
        return grid.sigma.sum()

    total(discrete_grid(sched, 10, "leading"))
    total(discrete_grid(sched, 10, "karras"))
    assert len(traces) == 1


def test_discrete_uniform_and_quadratic(sched):
    np.testing.assert_array_equal(discrete_grid(sched, 7, "uniform").t, discrete_grid(sched, 7, "linspace").t)
    # DDIM's code: seq = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]
    g = discrete_grid(sched, 10, "quadratic")
    seq = [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), 10) ** 2)]
    np.testing.assert_array_equal(g.t[:-1], seq[::-1])
    assert seq[::-1] == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    with pytest.raises(ValueError, match="sampler.steps=50.*repeats"):    # int() repeats t = 0 for S = 50
        discrete_grid(sched, 50, "quadratic")


def test_zero_terminal_snr_grids():
    z = make_schedule("scaled_linear", T, zero_terminal_snr=True)
    g = discrete_grid(z, 10, "trailing")
    assert g.t[0] == T - 1 and g.alpha[0] == 0 and g.lam[0] == -jnp.inf
    for spacing in ("karras", "logsnr"):   # alpha_bar_{T-1} = 2^-24 as diffusers, so s_max = 4096
        g = discrete_grid(z, 10, spacing)
        assert np.all(np.isfinite(np.asarray(g.sigma_ve))) and abs(float(g.sigma_ve[0]) / 4096 - 1) < 1e-6
        assert abs(float(g.t[0]) - (T - 1)) < 1e-3


@pytest.mark.parametrize("sde", SDES + VDMS, ids=SCHEDULE_IDS)
def test_continuous_grids(sde):
    K = 12
    for spacing in ("uniform", "quadratic", "karras", "logsnr"):
        for final in ("zero", "last"):
            g = continuous_grid(sde, K, spacing, final=final)
            n = K + (final == "last")
            assert g.num_steps == K
            np.testing.assert_allclose(g.t[np.array([0, n - 1])], sde.network_time(jnp.array([sde.t_max, sde.t_min])),
                                       rtol=1e-6)
            assert np.all(np.diff(np.asarray(g.sigma_ve)) < 0), (spacing, final)
            if final == "zero":
                assert (g.t[-1], g.alpha[-1], g.sigma[-1]) == (0.0, 1.0, 0.0)
    t = jnp.linspace(sde.t_max, sde.t_min, K)
    np.testing.assert_allclose(continuous_grid(sde, K, "uniform").alpha[:-1], sde.alpha(t), rtol=1e-6)
    lam = continuous_grid(sde, K, "logsnr", final="last").lam
    np.testing.assert_allclose(np.diff(np.asarray(lam)), float(lam[1] - lam[0]), rtol=2e-3)
    s = np.asarray(continuous_grid(sde, K, "karras", rho=5.0).sigma_ve[:-1], np.float64)
    np.testing.assert_allclose(np.diff(s ** (1 / 5)), (s[-1] ** 0.2 - s[0] ** 0.2) / (K - 1), rtol=2e-3)


def test_grid_argument_errors(sched):
    for kw, name in [({"steps": 0}, "sampler.steps"), ({"steps": 2.0}, "sampler.steps"),
                     ({"steps": True}, "sampler.steps"), ({"spacing": "cosine"}, "sampler.spacing"),
                     ({"rho": 0.0}, "sampler.rho"), ({"rho": float("inf")}, "sampler.rho"),
                     ({"final": "sigma_min"}, "sampler.final"), ({"steps": T}, "sampler.steps")]:
        args = {"steps": 10, "spacing": "leading", **kw}
        final = args.pop("final", "last" if args["steps"] == T else "zero")
        with pytest.raises(ValueError, match=name):
            discrete_grid(sched, args.pop("steps"), args.pop("spacing"), final=final, **args)
    with pytest.raises(ValueError, match="sampler.spacing='leading'.*continuous"):
        continuous_grid(sdes.VPSDE(), 10, "leading")
    assert discrete_grid(sched, T, "leading").num_steps == T     # all T timesteps + the clean end is fine


# ---------------------------------------------------------------------------------------- continuous SDEs
@pytest.mark.parametrize("sde", SDES + VDMS, ids=SCHEDULE_IDS)
def test_sde_marginals_match_forward_sde(sde):
    """d log alpha/dt = f and d sigma^2/dt = 2 f sigma^2 + g^2 (moments of the linear SDE); log_snr inverts."""
    t = jnp.linspace(sde.t_min, sde.t_max, 9)
    dlog_alpha = jax.vmap(jax.grad(lambda u: jnp.log(sde.alpha(u))))(t)
    dvar = jax.vmap(jax.grad(lambda u: sde.sigma(u) ** 2))(t)
    np.testing.assert_allclose(dlog_alpha, sde.f(t), rtol=1e-5, atol=1e-6)
    drift, g2 = 2 * sde.f(t) * sde.sigma(t) ** 2, sde.g2(t)        # (they cancel to ~beta alpha^2 for VP at t = 1)
    assert np.all(np.abs(dvar - (drift + g2)) <= 1e-5 * (np.abs(drift) + g2)), (dvar, drift + g2)
    np.testing.assert_allclose(sde.log_snr(t), 2 * jnp.log(sde.alpha(t) / sde.sigma(t)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sde.t_of_log_snr(sde.log_snr(t)), t, rtol=2e-5, atol=1e-7)


def test_sde_closed_forms():
    t = jnp.linspace(1e-3, 1.0, 7)
    vp, svp, ve = sdes.VPSDE(), sdes.SubVPSDE(), sdes.VESDE()
    np.testing.assert_allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, 1.0, rtol=1e-6)
    cs = ContinuousSchedule.from_config("linear", 1000)            # the same VP-SDE, from schedules.py
    np.testing.assert_allclose(vp.sigma(t), cs.sigma(t), rtol=1e-6)
    np.testing.assert_allclose(vp.alpha(t), cs.alpha(t), rtol=1e-6)
    np.testing.assert_allclose(svp.alpha(t), vp.alpha(t))
    t64 = np.asarray(t, np.float64)
    np.testing.assert_allclose(svp.sigma(t), -np.expm1(-(0.1 * t64 + 9.95 * t64 ** 2)), rtol=1e-5)  # 1 - e^{-B}
    np.testing.assert_allclose(ve.sigma(jnp.array([0.0, 1.0])), [0.01, 50.0], rtol=1e-6)
    np.testing.assert_allclose(vp.network_time(t), 999 * t)
    np.testing.assert_allclose(ve.network_time(t), ve.sigma(t))
    e = sdes.EDMSchedule()
    assert (e.t_min, e.t_max) == (0.002, 80.0) and float(e.network_time(3.0)) == 3.0 and float(e.sigma(3.0)) == 3.0


def test_vdm_schedule_closed_forms():
    lin, curved = VDMS
    t = jnp.linspace(0.0, 1.0, 7)
    g = -13.3 + 18.3 * np.asarray(t, np.float64)
    np.testing.assert_allclose(lin.sigma(t) ** 2, 1 / (1 + np.exp(-g)), rtol=1e-5)       # sigmoid(gamma)
    np.testing.assert_allclose(lin.alpha(t) ** 2 + lin.sigma(t) ** 2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(lin.g2(t), 18.3 / (1 + np.exp(-g)), rtol=1e-5)           # beta = gamma' sigma^2
    np.testing.assert_allclose(lin.network_time(t), 1000 * t, rtol=1e-5, atol=1e-3)
    slope = np.diff(np.asarray(curved.gamma_t(jnp.linspace(0, 1, 101))))
    assert np.all(slope > 0) and slope.max() > 3 * slope.min()                          # monotone, far from linear
    np.testing.assert_allclose(curved.network_time(t), 1000 * (curved.gamma_t(t) + 13.3) / 18.3, rtol=1e-5)


def test_vdm_learned_gamma_changes_the_path_not_the_ode_solution():
    """The probability-flow ODE depends on the schedule only through its log-SNR range (Kingma et al. 2021, sec. 5.1):
    a network that sees gamma (VDM's time input) and a solver on a grid uniform in log-SNR give the same samples for
    a linear and a strongly curved gamma with the same ends."""
    from diffusion_jax.samplers import run_sampler

    lin, curved = pvdm.VDMSchedule(pvdm.LinearGamma(), {}), curved_gamma(fixed_endpoints=True)

    def network(x, t_net):           # the exact N(MU, S^2) denoiser as an eps network of VDM's time input
        gamma = -13.3 + 18.3 * t_net / 1000.0
        return gaussian("eps", lambda _: pvdm.alpha_sigma(gamma))(x, t_net)

    x_T = jax.random.normal(jax.random.key(2), (64, 3))
    out = [run_sampler(name, network, s, None, x_T.shape, steps=12, spacing="logsnr", x_T=x_T)[0]
           for s in (lin, curved) for name in ("dpmpp_2m", "heun")]
    np.testing.assert_allclose(out[2], out[0], atol=2e-4)
    np.testing.assert_allclose(out[3], out[1], atol=2e-4)
    assert abs(float(jnp.mean(out[0])) - MU) < 0.1 and abs(float(jnp.std(out[0])) - S) < 0.1


# -------------------------------------------------------------------------------------------- the wrapper
def gaussian(prediction, level):
    """The exact denoiser of N(MU, S^2 I) data as a network of kind `prediction`; level(t) -> (alpha, sigma)."""
    if prediction == "edm":          # D(x_ve; s) = E[x0 | x0 + s eps = x_ve]
        return lambda y, s: MU + S ** 2 / (S ** 2 + s[:, None] ** 2) * (y - MU)

    def net(x, t):
        a, sg = (v[:, None] for v in level(t))
        if prediction == "score":
            return -(x - a * MU) / (a ** 2 * S ** 2 + sg ** 2)
        return from_x0_eps(prediction, *gaussian_x0_eps(x, a, sg), a, sg)
    return net


def _levels(sched):
    """(name, grid, level) for VP discrete, VP / sub-VP / VE / EDM continuous grids."""
    out = [("ddpm", discrete_grid(sched, 8, "leading"),
            lambda t: (sched.alpha(t.astype(jnp.int32)), sched.sigma(t.astype(jnp.int32))))]
    for sde in SDES:
        scale = getattr(sde, "time_scale", None)
        if scale is None:      # network time is sigma (alpha = 1)
            level = lambda t: (jnp.ones_like(t), t)
        else:
            level = lambda t, sde=sde, scale=scale: (sde.alpha(t / scale), sde.sigma(t / scale))
        out.append((type(sde).__name__, continuous_grid(sde, 8, "karras"), level))
    return out


def test_every_parameterization_gives_the_same_denoiser(sched):
    x_unit = jax.random.normal(jax.random.key(1), (4, 3))
    for name, grid, level in _levels(sched):
        vp = name in ("ddpm", "VPSDE")
        kinds = ("eps", "x0", "v", "score", "edm") if vp else ("eps", "x0", "score", "edm")   # v needs VP
        for i in range(grid.num_steps):          # every level but the clean end
            t, a, sg = grid.t[i], grid.alpha[i], grid.sigma[i]
            x = a * (MU + S * x_unit) + sg * jax.random.normal(jax.random.key(i), x_unit.shape)
            x0_ref, eps_ref = gaussian_x0_eps(x, a, sg)
            scale = 1.0 + float(jnp.abs(x).max())
            for kind in kinds:
                x0, eps = make_denoiser(gaussian(kind, level), kind)(x, t, a, sg)
                # compared in x units (alpha x0, sigma eps): the pieces x is made of
                np.testing.assert_allclose(a * x0, a * x0_ref, atol=3e-6 * scale, err_msg=f"{name} {i} {kind}")
                np.testing.assert_allclose(sg * eps, sg * eps_ref, atol=3e-6 * scale, err_msg=f"{name} {i} {kind}")


def test_clipping_rederives_eps():
    x, a, sg = jnp.array([[3.0, -0.2]]), 0.8, 0.6
    x0, eps = make_denoiser(lambda x, t: x, "x0", clip_denoised=1.0)(x, 5.0, a, sg)
    np.testing.assert_allclose(x0, [[1.0, -0.2]])
    np.testing.assert_allclose(a * x0 + sg * eps, x, rtol=1e-6)       # eps re-derived from the clipped x0


def _cond(x, t):
    return 2.0 * x + 1.0


def _uncond(x, t):
    return 0.5 * x - 1.0


def test_guidance_formula_and_pairs():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    t, a, sg = 500.0, 0.6, 0.8

    def never(x, t):
        raise AssertionError("uncond_fn must not run at scale 1")

    plain = make_denoiser(_cond, "eps")(x, t, a, sg)
    for g in (None, Guidance(), Guidance(1.0, rescale=0.7, interval=(0.1, 2.0))):
        np.testing.assert_array_equal(make_denoiser(_cond, "eps", guidance=g, uncond_fn=never)(x, t, a, sg)[1],
                                      plain[1])
    w = 4.5
    x0, eps = make_denoiser(_cond, "eps", guidance=Guidance(w), uncond_fn=_uncond)(x, t, a, sg)
    eps_ref = _uncond(x, t) + w * (_cond(x, t) - _uncond(x, t))
    np.testing.assert_allclose(eps, eps_ref, rtol=1e-6)
    np.testing.assert_allclose(x0, (x - sg * eps_ref) / a, rtol=1e-5)
    # one batched call of net(x, t, y) on [cond; uncond] gives the same
    calls = []

    def net(x, t, y):
        calls.append(x.shape[0])
        return jnp.where(y[:, None, None, None] == 1, _cond(x, t), _uncond(x, t))

    y, y_null = jnp.ones((3,), jnp.int32), jnp.zeros((3,), jnp.int32)
    out = make_denoiser(_cond, "eps", guidance=Guidance(w), pair_fn=batched_pair(net, y, y_null))(x, t, a, sg)
    np.testing.assert_allclose(out[1], eps, rtol=1e-6)
    assert calls == [6]
    # guidance in the prediction space for an EDM network: D = D_u + w (D_c - D_u)
    x0, _ = make_denoiser(_cond, "edm", guidance=Guidance(w), uncond_fn=_uncond)(x, t, a, sg)
    np.testing.assert_allclose(x0, _uncond(x / a, 0) + w * (_cond(x / a, 0) - _uncond(x / a, 0)), rtol=1e-5)


@pytest.mark.torch
def test_rescale_worked_example_and_diffusers():
    # Lin et al. 2024 Alg. 2 by hand: cond = [1, -1, 1, -1] (std 1), uncond = 0, w = 3 -> cfg = 3 cond (std 3);
    # rescaled = cfg * 1/3 = cond; phi = 0.5 -> 0.5 cond + 0.5 cfg = 2 cond.
    cond = jnp.array([[1.0, -1.0, 1.0, -1.0]])
    np.testing.assert_allclose(guide(cond, jnp.zeros_like(cond), 3.0, 0.5), [[2.0, -2.0, 2.0, -2.0]])
    np.testing.assert_allclose(guide(cond, jnp.zeros_like(cond), 3.0, 1.0), cond)
    np.testing.assert_allclose(guide(cond, jnp.zeros_like(cond), 3.0, 0.0), 3 * cond)
    # against diffusers' rescale_noise_cfg (Stable Diffusion pipelines' guidance_rescale)
    need("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    c, u = (np.random.default_rng(k).normal(size=(2, 4, 8, 8)).astype(np.float32) for k in (0, 1))
    cfg = u + 7.5 * (c - u)
    ref = rescale_noise_cfg(to_torch(cfg), to_torch(c), guidance_rescale=0.7).numpy()
    # diffusers takes std over dims 1.. of NCHW, we over 1.. of NHWC: the same set of elements per example
    np.testing.assert_allclose(guide(jnp.asarray(c), jnp.asarray(u), 7.5, 0.7), ref, rtol=1e-5, atol=1e-5)


def test_guidance_interval():
    x = jax.random.normal(jax.random.key(0), (2, 5))
    g = Guidance(3.0, interval=(0.5, 2.0))
    den = jax.jit(make_denoiser(_cond, "eps", guidance=g, uncond_fn=_uncond))
    for alpha, sigma in [(1.0, 0.4), (1.0, 0.5), (0.6, 0.8), (1.0, 2.0), (1.0, 2.5), (0.1, 0.99)]:
        inside = 0.5 <= sigma / alpha <= 2.0
        want = guide(_cond(x, 0), _uncond(x, 0), 3.0) if inside else _cond(x, 0)
        np.testing.assert_allclose(den(x, 1.0, alpha, sigma)[1], want, rtol=1e-6, err_msg=f"{sigma / alpha}")


def test_wrapper_argument_errors():
    with pytest.raises(ValueError, match="sampler.prediction"):
        make_denoiser(_cond, "velocity")
    with pytest.raises(ValueError, match="sampler.clip_denoised"):
        make_denoiser(_cond, "eps", clip_denoised=0.0)
    with pytest.raises(ValueError, match="uncond_fn"):
        make_denoiser(_cond, "eps", guidance=Guidance(2.0))
    with pytest.raises(ValueError, match="uncond_fn"):
        make_denoiser(_cond, "eps", guidance=Guidance(2.0), uncond_fn=_uncond, pair_fn=lambda x, t: (x, x))
    with pytest.raises(ValueError, match="guidance"):
        make_denoiser(_cond, "eps", guidance=3.0)
    for kw, name in [({"scale": float("nan")}, "guidance.scale"), ({"rescale": 1.5}, "guidance.rescale"),
                     ({"interval": (2.0, 1.0)}, "guidance.interval"), ({"interval": (1.0,)}, "guidance.interval")]:
        with pytest.raises(ValueError, match=name):
            Guidance(**kw)


def test_euler_in_ve_coordinates_on_a_grid_is_ddim(sched):
    """Euler on dy/ds = (y - x0_hat)/s over discrete_grid(leading) is deterministic DDIM, step for step."""
    net = gaussian("eps", lambda t: (sched.alpha(t.astype(jnp.int32)), sched.sigma(t.astype(jnp.int32))))
    grid = discrete_grid(sched, 20, "leading")
    x_T = jax.random.normal(jax.random.key(3), (16, 3))

    @jax.jit
    def euler(grid, x_T):
        d = ode_derivative(make_denoiser(net, "eps"))

        def step(y, i):
            dy, _ = d(y, grid.t[i], grid.alpha[i], grid.sigma[i])
            return y + (grid.sigma_ve[i + 1] - grid.sigma_ve[i]) * dy, None
        y, _ = jax.lax.scan(step, x_T / grid.alpha[0], jnp.arange(grid.num_steps))
        return grid.alpha[-1] * y

    ref, _ = run_sampler("ddim", net, sched, jax.random.key(0), x_T.shape, steps=20, x_T=x_T)
    np.testing.assert_allclose(euler(grid, x_T), ref, rtol=1e-4, atol=1e-4)
    assert isinstance(grid, Grid)
