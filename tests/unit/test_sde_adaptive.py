"""Reverse-SDE solvers, common random numbers and the adaptive PF-ODE solve on the exact-score Gaussian-mixture
testbed: samples against the true mixture (MMD^2 with its standard error, Gaussian W2 against exact samples'
spread), the ODE against the float64 reference, Brownian paths shared across step counts, option errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.process import sde as sdes
from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.samplers.adaptive import adaptive_ode
from diffusion_jax.samplers.brownian import brownian_path, step_normals
from diffusion_jax.samplers.grid import Grid, continuous_grid, discrete_grid
from diffusion_jax.samplers.sde_solvers import euler_maruyama, predictor_corrector
from diffusion_jax.samplers.wrapper import make_denoiser
from diffusion_jax.testbed import (
    GaussianMixture,
    alpha_sigma_denoiser,
    discrete_denoise_fn,
    gaussian_w2,
    mixture_mmd2,
    reference_ode_solution,
)

D = 16
VP = sdes.VPSDE(t_min=1e-4)          # t_min small: the final Tweedie jump's variance bias (sigma_min^2 / s_k^2) is tiny


@pytest.fixture(scope="module")
def mix():
    return GaussianMixture.random(jax.random.key(0), num_components=6, dim=D)


@pytest.fixture(scope="module")
def den(mix):
    f = alpha_sigma_denoiser(mix, "eps")          # a "network" on score_sde's time input t * 999
    return make_denoiser(lambda x, t: f(x, VP.alpha(t / VP.time_scale), VP.sigma(t / VP.time_scale)), "eps")


def _noise(n, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, D))


# ------------------------------------------------------------------------------------- samples vs the mixture
@pytest.mark.parametrize("options", [dict(predictor="euler_maruyama", corrector="none", sde=VP),
                                     dict(predictor="reverse_diffusion", corrector="langevin", snr=0.16)],
                         ids=["euler_maruyama", "pc_langevin"])
def test_sde_samples_approach_the_mixture(mix, den, options):
    n = 2000
    x_T = _noise(n)
    w2_exact = [gaussian_w2(mix, mix.sample(jax.random.key(10 + i), n)) for i in range(6)]
    mmd, se, w2 = {}, {}, {}
    for K in (20, 100, 500):
        grid = continuous_grid(VP, K)
        x, info = jax.jit(lambda x, k: predictor_corrector(den, grid, x, k, **options))(x_T, jax.random.key(3))
        assert info["nfe"] == K * (2 if options["corrector"] == "langevin" else 1)
        mmd[K], se[K] = mixture_mmd2(mix, x, 0.5, return_stderr=True)
        w2[K] = gaussian_w2(mix, x)
    # falls with the step count (up to the estimate's noise), and at 500 steps is that of exact samples:
    # E[MMD^2] = 0 for them, so |MMD^2| < 4.5 standard errors; W2 within 5 std of exact samples' W2 at equal n
    assert mmd[20] > mmd[100] + 3 * se[100] and mmd[500] < mmd[100] + 3 * se[100], (mmd, se)
    assert abs(mmd[500]) < 4.5 * se[500], (mmd, se)
    assert w2[20] > w2[100] > np.mean(w2_exact) and w2[500] < np.mean(w2_exact) + 5 * np.std(w2_exact), (w2, w2_exact)


def test_predictors_nfe_trajectory_jit_vmap(mix, den):
    x_T = _noise(64)
    grid = continuous_grid(VP, 8)
    key = jax.random.key(4)
    for pred in ("reverse_diffusion", "ancestral", "euler_maruyama"):
        x, info = jax.jit(lambda x: predictor_corrector(den, grid, x, key, predictor=pred, corrector="none",
                                                        return_trajectory=True))(x_T)
        assert info["nfe"] == 8 and info["trajectory"].shape == (9, 64, D) and np.all(np.isfinite(x))
        np.testing.assert_array_equal(info["trajectory"][0], x_T)
        np.testing.assert_array_equal(info["trajectory"][-1], x)
    # annealed Langevin (predictor none): K levels x 2 corrector steps + the final Tweedie evaluation
    x, info = jax.jit(lambda x: predictor_corrector(den, grid, x, key, predictor="none", n_corrector_steps=2))(x_T)
    assert info["nfe"] == 17 and np.all(np.isfinite(x))
    # a grid ending at sigma > 0: one more evaluation for x0_hat, none without denoise_final
    last = continuous_grid(VP, 8, final="last")
    assert last.num_steps == 8 and float(last.sigma[-1]) > 0
    for final, nfe in ((True, 9), (False, 8)):
        assert jax.jit(lambda x: euler_maruyama(den, last, x, key, denoise_final=final))(x_T)[1]["nfe"] == nfe
    # the grid as a traced jit argument (nfe then traced) under vmap over keys agrees with the plain jitted call
    keys = jax.random.split(key, 2)
    run = jax.jit(lambda k: euler_maruyama(den, grid, x_T, k, noise="brownian"))
    xs, info = jax.jit(jax.vmap(lambda g, k: euler_maruyama(den, g, x_T, k, noise="brownian"), (None, 0)))(grid, keys)
    assert np.all(np.asarray(info["nfe"]) == 8)
    for k, xv in zip(keys, xs):           # float32 rounding of the traced Brownian span: ~1e-5 relative
        np.testing.assert_allclose(xv, run(k)[0], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------- common random numbers
def test_brownian_increments_are_shared_across_grids():
    shape, key = (4000,), jax.random.key(5)
    level = lambda K: Grid(t=jnp.linspace(999.0, 0.0, K + 1), alpha=jnp.ones(K + 1), sigma=jnp.linspace(1, 0, K + 1))
    coarse, fine = level(10), level(20)                                 # fine contains coarse's levels

    @jax.jit
    def increments(grid, k=key):
        w0, draw = step_normals("brownian", k, grid, shape, span=(0.0, 999.0))
        dtau = -jnp.diff(grid.t)
        _, z = jax.lax.scan(lambda w, i: draw(w, i)[::-1], w0, jnp.arange(grid.num_steps))
        return z, z * jnp.sqrt(dtau)[:, None]

    zc, dwc = increments(coarse)
    zf, dwf = increments(fine)
    np.testing.assert_allclose(dwc, dwf[0::2] + dwf[1::2], atol=2e-3)    # same path: W(t_i) - W(t_{i+1})
    assert abs(float(zf.mean())) < 0.01 and abs(float(zf.std()) - 1) < 0.01      # i.i.d. N(0, 1)
    np.testing.assert_array_equal(increments(coarse)[0], zc)                      # same key, same path
    assert np.abs(np.corrcoef(increments(coarse, jax.random.key(6))[0].ravel(), zc.ravel())[0, 1]) < 0.05
    path = brownian_path(key, shape, (0.0, 999.0))
    np.testing.assert_array_equal(path.evaluate(123.0), brownian_path(key, shape, (0.0, 999.0)).evaluate(123.0))


def test_common_random_numbers_converge_across_step_counts(den):
    """With one Brownian path the 2K-step Euler-Maruyama sample converges to the K-step one (strong order ~1 here,
    additive noise); with independent noise they stay two unrelated samples."""
    x_T, key = _noise(256, seed=7), jax.random.key(8)

    def sample(K, noise):
        grid = continuous_grid(VP, K)
        return np.asarray(jax.jit(lambda x: euler_maruyama(den, grid, x, key, sde=VP, noise=noise)[0])(x_T))

    def gap(a, b):                       # median over samples (a few cross a mode boundary at coarse steps)
        return float(np.median(np.linalg.norm(a - b, axis=1)))

    xs = {K: sample(K, "brownian") for K in (50, 100, 200)}
    b = [gap(xs[2 * K], xs[K]) for K in (50, 100)]
    ind = gap(sample(100, "independent"), sample(200, "independent"))
    assert b[1] < b[0] / 2 and b[1] < 0.05 * ind, (b, ind)


# ------------------------------------------------------------------------------------------- adaptive ODE
def test_adaptive_ode_matches_reference(mix, den):
    x_T = _noise(64, seed=9)
    grid = continuous_grid(VP, 10)
    ref = reference_ode_solution(mix, x_T, float(grid.sigma[0]), alpha_from=float(grid.alpha[0]))
    err, nfe = {}, {}
    for solver, tol in (("tsit5", 1e-3), ("tsit5", 1e-5)):
        run = jax.jit(lambda x: adaptive_ode(den, grid, x, solver=solver, rtol=tol, atol=tol, sigma_min=1e-4, sde=VP))
        x, info = run(x_T)
        assert bool(info["success"])
        err[solver, tol] = float(np.sqrt(np.mean((np.asarray(x, np.float64) - ref) ** 2)))
        nfe[solver, tol] = int(info["nfe"])
        assert err[solver, tol] < 5 * tol, (err, nfe)
    assert nfe["tsit5", 1e-3] < nfe["tsit5", 1e-5], nfe
    # vmap: four independent solves (own step sizes), each close to the reference
    xv, iv = jax.jit(jax.vmap(lambda x: adaptive_ode(den, grid, x, rtol=1e-4, atol=1e-4, sigma_min=1e-4, sde=VP)))(
        x_T.reshape(4, 16, D))
    assert iv["nfe"].shape == (4,) and bool(np.all(iv["success"]))
    assert np.sqrt(np.mean((np.asarray(xv, np.float64).reshape(64, D) - ref) ** 2)) < 5e-4


def test_adaptive_nfe_counts_evaluations_and_trajectory(mix, den):
    x_T = _noise(8, seed=10)
    grid = continuous_grid(VP, 6)
    calls = []

    def counted(x, t, alpha, sigma):
        jax.debug.callback(lambda: calls.append(1), ordered=True)
        return den(x, t, alpha, sigma)

    x, info = adaptive_ode(counted, grid, x_T, solver="dopri5", rtol=1e-4, atol=1e-4, sde=VP, return_trajectory=True)
    jax.effects_barrier()
    assert len(calls) == int(info["nfe"]) == 6 * int(info["num_steps"]) + 2
    traj = np.asarray(info["trajectory"])
    assert traj.shape == (7, 8, D)
    np.testing.assert_array_equal(traj[-1], x)
    k = 3                                                   # an intermediate level, in VP coordinates
    mid = reference_ode_solution(mix, x_T, float(grid.sigma[0]), float(grid.sigma[k]), alpha_from=float(grid.alpha[0]),
                                 alpha_to=float(grid.alpha[k]))
    np.testing.assert_allclose(traj[k], mid, atol=2e-3)


def test_adaptive_on_a_discrete_grid_interpolates_levels(mix):
    sched = make_schedule("linear", 1000)
    grid = discrete_grid(sched, 999, "linspace")           # all timesteps: t interpolated in log s between them
    den = make_denoiser(discrete_denoise_fn(mix, sched, "eps"), "eps")
    x_T = _noise(32, seed=11)
    x, info = jax.jit(lambda x: adaptive_ode(den, grid, x, rtol=1e-5, atol=1e-5))(x_T)
    ref = reference_ode_solution(mix, x_T, float(grid.sigma[0]), alpha_from=float(grid.alpha[0]))
    # error dominated by the final jump from s_min = s(t=0) ~ 0.01: O(s_min^2 / s_k^2) of the component spread
    assert bool(info["success"]) and np.sqrt(np.mean((np.asarray(x) - ref) ** 2)) < 2e-3


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("options,match", [
    (dict(predictor="heun"), "sampler.predictor"), (dict(corrector="hmc"), "sampler.corrector"),
    (dict(snr=0.0), "sampler.snr"), (dict(snr=float("nan")), "sampler.snr"),
    (dict(n_corrector_steps=-1), "sampler.n_corrector_steps"),
    (dict(n_corrector_steps=1.5), "sampler.n_corrector_steps"), (dict(noise="sobol"), "sampler.noise"),
    (dict(noise="brownian", brownian_span=(1.0, 0.0)), "sampler.brownian_span"),
    (dict(noise="brownian", brownian_tol=-1.0), "sampler.brownian_tol"),
    (dict(denoise_final=1), "sampler.denoise_final"),
    (dict(sde="vp"), "sampler.sde"), (dict(key=None), "needs a key")])
def test_sde_option_errors(den, options, match):
    options = dict(dict(key=jax.random.key(0)), **options)
    with pytest.raises(ValueError, match=match):
        predictor_corrector(den, continuous_grid(VP, 4), _noise(4), **options)


@pytest.mark.parametrize("options,match", [
    (dict(rtol=0.0), "sampler.rtol"), (dict(rtol=float("inf")), "sampler.rtol"), (dict(atol=-1.0), "sampler.atol"),
    (dict(solver="euler"), "sampler.solver"), (dict(sigma_min=0.0), "sampler.sigma_min"),
    (dict(sigma_min=1e3), "sampler.sigma_min"), (dict(max_steps=0), "sampler.max_steps"),
    (dict(dt0=-0.1), "sampler.dt0"), (dict(sde=3), "sampler.sde")])
def test_adaptive_option_errors(den, options, match):
    with pytest.raises(ValueError, match=match):
        adaptive_ode(den, continuous_grid(VP, 4), _noise(4), **options)
