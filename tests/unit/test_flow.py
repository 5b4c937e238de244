"""Flow matching (process/flow.py, objectives/flow.py, samplers/flow.py, the "flow" prediction): the process's
identities, the exact mixture velocity against the continuity equation, the loss and its time samplers, and the
solvers' orders and agreement on the exact velocity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config import Experiment, build_schedule
from diffusion_jax.objectives import param
from diffusion_jax.objectives.build import make_objective
from diffusion_jax.objectives.discrete import LossConfig
from diffusion_jax.objectives.flow import FlowLossConfig, sample_time
from diffusion_jax.process.flow import RectifiedFlow
from diffusion_jax.samplers import run_sampler
from diffusion_jax.samplers.grid import MIN_ALPHA_BAR, continuous_grid
from diffusion_jax.testbed import GaussianMixture, alpha_sigma_denoiser, process_denoise_fn

MIX = GaussianMixture.random(jax.random.key(0), 3, 2)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_process_identities(shift):
    flow = RectifiedFlow(shift=shift)
    t = jnp.linspace(0.05, 0.95, 7)
    np.testing.assert_allclose(flow.alpha(t) + flow.sigma(t), 1.0, atol=1e-6)
    np.testing.assert_allclose(flow.t_of_log_snr(flow.log_snr(t)), t, atol=1e-5)
    np.testing.assert_allclose(flow.network_level(flow.network_time(t))[1], flow.sigma(t), atol=1e-6)
    h = 1e-3   # f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2, by central differences
    d = lambda fn: (fn(t + h) - fn(t - h)) / (2 * h)                                          # noqa: E731
    np.testing.assert_allclose(flow.f(t), d(lambda u: jnp.log(flow.alpha(u))), rtol=1e-3)
    np.testing.assert_allclose(flow.g2(t), d(lambda u: flow.sigma(u) ** 2) - 2 * flow.f(t) * flow.sigma(t) ** 2,
                               rtol=2e-3)
    assert float(flow.sigma(0.5)) == pytest.approx(shift / (1 + shift))                      # SD3's shift
    with pytest.raises(ValueError, match="schedule.shift=0"):
        RectifiedFlow(shift=0)


def test_flow_prediction_round_trip():
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 5, 3))
    sigma = np.array([0.0, 0.3, 0.7, 1.0, 0.5])[:, None]
    alpha = 1.0 - sigma
    xt = alpha * x0 + sigma * eps
    v = param.from_x0_eps("flow", x0, eps, alpha, sigma)
    np.testing.assert_allclose(v, eps - x0)
    back = param.to_x0_eps("flow", v, xt, alpha, sigma)
    np.testing.assert_allclose(back[0], x0, atol=1e-12)
    np.testing.assert_allclose(back[1], eps, atol=1e-12)
    np.testing.assert_allclose(param.convert(v, "flow", "eps", xt, alpha, sigma), eps, atol=1e-12)


def test_mixture_velocity_solves_the_continuity_equation():
    """d p_t / dt + div(p_t v_t) = 0 for the exact velocity v = E[eps - x0 | x_t] (testbed, 'flow'), p_t the noised
    mixture's density: an independent check of both closed forms (time derivative by central differences)."""
    jax.config.update("jax_enable_x64", True)
    try:
        mix = MIX.astype(jnp.float64)
        vel = alpha_sigma_denoiser(mix, "flow")

        def p(x, t):
            return jnp.exp(mix.log_prob(x[None], 1.0 - t, t)[0])

        def flux(x, t):
            return p(x, t) * vel(x[None], jnp.array([1.0 - t]), jnp.array([t]))[0]

        for x in np.random.default_rng(1).uniform(-1, 1, (5, 2)):
            for t in (0.2, 0.5, 0.8):
                x = jnp.asarray(x)
                dp_dt = (p(x, t + 1e-5) - p(x, t - 1e-5)) / 2e-5
                div = jnp.trace(jax.jacfwd(flux)(x, t))
                assert abs(float(dp_dt + div)) <= 1e-6 * max(1.0, abs(float(dp_dt))), (x, t, dp_dt, div)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_time_samplers():
    key = jax.random.key(0)
    n = 200_000
    uniform = np.asarray(sample_time(FlowLossConfig(), key, (n,)))
    assert abs(uniform.mean() - 0.5) < 0.005 and uniform.min() >= 1e-5 and uniform.max() <= 1 - 1e-5
    ln = np.asarray(sample_time(FlowLossConfig(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.7), key,
                                (n,)))
    logit = np.log(ln / (1 - ln))
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 0.7) < 0.01
    mode0 = np.asarray(sample_time(FlowLossConfig(time_sampling="mode", mode_scale=0.0), key, (n,)))
    assert abs(mode0.mean() - 0.5) < 0.005 and abs(mode0.std() - 12 ** -0.5) < 0.005     # s = 0: uniform
    mode = np.asarray(sample_time(FlowLossConfig(time_sampling="mode", mode_scale=1.29), key, (n,)))
    assert np.mean(np.abs(mode - 0.5) < 0.1) > np.mean(np.abs(mode0 - 0.5) < 0.1)          # mass at the middle
    for bad, match in ((dict(time_sampling="cosine"), "time_sampling"), (dict(mode_scale=2.0), "mode_scale"),
                       (dict(prediction="v"), "trains one of")):
        with pytest.raises(ValueError, match=match):
            FlowLossConfig(**bad).validate()


def test_flow_matching_loss_is_the_velocity_mse_for_every_parameterization():
    """With the exact network the loss is the irreducible E||v* - (eps - x0)||^2, the same whether the network
    predicts the velocity, eps or x0; a perturbed velocity costs more; kind / prediction mismatches are refused."""
    flow = RectifiedFlow()
    x0 = np.asarray(MIX.sample(jax.random.key(3), 4096)).reshape(4096, 1, 1, 2)
    losses = {}
    for prediction in ("flow", "eps", "x0"):
        f = process_denoise_fn(MIX, flow, prediction)
        objective = make_objective(flow, LossConfig(prediction=prediction))
        losses[prediction] = float(objective(lambda p, x, t, **kw: f(x, t) + p, 0.0, {"image": x0},
                                             jax.random.key(4))[0])
    assert losses["flow"] == pytest.approx(losses["eps"], rel=2e-3) == pytest.approx(losses["x0"], rel=2e-3)
    f = process_denoise_fn(MIX, flow, "flow")
    worse = make_objective(flow, LossConfig(prediction="flow"))(lambda p, x, t, **kw: f(x, t) + p, 0.1,
                                                                 {"image": x0}, jax.random.key(4))[0]
    assert float(worse) == pytest.approx(losses["flow"] + 0.01, rel=0.02)
    base = dict(seed=0, data={"name": "digits"},
                model={"channels": 16, "num_res_blocks": 1, "num_groups": 8, "image_size": 16})
    with pytest.raises(ValueError, match="loss.prediction='flow' .* needs schedule.kind='flow'"):
        Experiment.from_config({**base, "loss": {"prediction": "flow"}})
    with pytest.raises(ValueError, match="loss.time_sampling is a flow-matching setting"):
        Experiment.from_config({**base, "schedule": {"kind": "vp"}, "loss": {"time_sampling": "logit_normal"}})
    exp = Experiment.from_config({**base, "schedule": {"kind": "flow", "shift": 3.0},
                                  "loss": {"prediction": "flow", "time_sampling": "logit_normal"},
                                  "sample": {"sampler": "flow_heun", "spacing": "uniform"}})
    assert build_schedule(exp.schedule) == RectifiedFlow(shift=3.0)


def test_grid_of_a_pure_noise_end_and_every_sampler_on_the_flow():
    """continuous_grid starts a flow at alpha^2 = MIN_ALPHA_BAR (finite x / alpha and log-SNR); deterministic
    samplers of every family land near the flow_heun answer from the same x_T on the exact velocity."""
    flow = RectifiedFlow()
    grid = continuous_grid(flow, 10)
    assert float(grid.alpha[0]) ** 2 == pytest.approx(MIN_ALPHA_BAR, rel=1e-3) and float(grid.sigma[-1]) == 0
    f = process_denoise_fn(MIX, flow, "flow")
    x_T = jax.random.normal(jax.random.key(5), (64, 2))
    def run(name, steps, spacing="uniform"):
        return np.asarray(run_sampler(name, f, flow, jax.random.key(6), x_T.shape, steps=steps, prediction="flow",
                                      spacing=spacing, x_T=x_T)[0])

    ref = run("flow_heun", 200)
    # the log-SNR solvers step in lambda: on uniform t their first step spans lambda from -16.6 (alpha = 2^-12),
    # which DPM-Solver-3's first block does not survive (max error 1.3 at 50 steps); logsnr spacing suits them
    for name, spacing in (("flow_euler", "uniform"), ("ddim", "uniform"), ("flow_midpoint", "uniform"),
                          ("heun", "uniform"), ("euler", "uniform"), ("lms", "uniform"), ("dpmpp_2m", "logsnr"),
                          ("unipc_bh2", "logsnr"), ("dpm_solver_3", "logsnr"), ("deis", "logsnr")):
        err = np.abs(run(name, 50, spacing) - ref).max()
        assert np.isfinite(err) and err < 0.03, (name, err)


def test_trailing_levels_are_even_steps_down_to_the_clean_end():
    """"trailing" on a continuous process: every level t_max (n - i) / n, as diffusers' FlowMatch sigmas on a flow
    (no level spent at t_min, where "uniform" puts its last evaluation); the other spacings end at t_min."""
    flow = RectifiedFlow()
    sigma = np.asarray(continuous_grid(flow, 4, "trailing").sigma)
    np.testing.assert_allclose(sigma, [1.0, 0.75, 0.5, 0.25, 0.0], atol=3e-4)
    assert float(continuous_grid(flow, 4, "uniform").sigma[-2]) == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(ValueError, match="spacing='leading' selects timesteps of a discrete schedule"):
        continuous_grid(flow, 4, "leading")


def test_solver_orders_on_the_exact_velocity():
    """Mean error against a 400-step Heun solution falls ~2x per doubling for Euler (order 1), ~4x for Heun and
    midpoint (order 2), on a smooth mixture (component std 0.4: the velocity does not stiffen near the data)."""
    flow = RectifiedFlow(shift=2.0)
    f = process_denoise_fn(GaussianMixture.random(jax.random.key(9), 3, 2, std=0.4), flow, "flow")
    x_T = jax.random.normal(jax.random.key(7), (64, 2))

    def run(name, steps):
        return np.asarray(run_sampler(name, f, flow, jax.random.key(8), x_T.shape, steps=steps, prediction="flow",
                                      spacing="uniform", x_T=x_T)[0], np.float64)

    ref = run("flow_heun", 400)
    for name, order in (("flow_euler", 1), ("flow_heun", 2), ("flow_midpoint", 2)):
        e1, e2 = (np.abs(run(name, k) - ref).mean() for k in (16, 32))
        assert 0.7 * order < np.log2(e1 / e2) < 1.5 * order, (name, e1, e2)
