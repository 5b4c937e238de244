"""Every sampler by name through `run_sampler`, on the exact-score testbed; errors at the name boundary."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.samplers import SAMPLERS, Guidance, run_sampler, sampler_options
from diffusion_jax.samplers.registry import count_nfe, steps_for_nfe
from diffusion_jax.testbed import GaussianMixture, discrete_denoise_fn

SCHEDULE = make_schedule("linear", 1000)
MIX = GaussianMixture.random(jax.random.PRNGKey(0), num_components=3, dim=4)
DENOISE = discrete_denoise_fn(MIX, SCHEDULE, "eps")
SPACING = {"ddpm": "trailing", "ddim": "trailing", "pndm": "leading"}  # PRK needs integer timesteps


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_jitted_by_name(name):
    spacing = SPACING.get(name, "karras")
    run = jax.jit(lambda key: run_sampler(name, DENOISE, SCHEDULE, key, (16, 4), steps=12, spacing=spacing))
    x, info = run(jax.random.PRNGKey(1))
    x = np.asarray(x)
    assert x.shape == (16, 4) and np.all(np.isfinite(x))
    # Same key, same samples (every solver's noise is a function of the key).
    np.testing.assert_array_equal(x, np.asarray(run(jax.random.PRNGKey(1))[0]))
    # The NFE that the compare harness plans with (found by tracing) is the one the run reports.
    if name != "adaptive":
        assert count_nfe(name, SCHEDULE, 12, spacing=spacing) == int(info["nfe"])
    # The samples land near the data (the mixture lives within about [-0.9, 0.9]); at 12 steps even the
    # noise-prediction DPM-Solver-3 stays below 1.5 (at 6 Karras steps it overshoots to ~7: see the notes).
    assert np.abs(x).max() < 3.0


def test_unknown_names_and_options_are_refused():
    with pytest.raises(ValueError, match="sampler.name='dpm_2m'.*dpmpp_2m"):
        run_sampler("dpm_2m", DENOISE, SCHEDULE, jax.random.PRNGKey(0), (2, 4), steps=4)
    with pytest.raises(ValueError, match="no option 's_churn'.*eta"):
        run_sampler("ddim", DENOISE, SCHEDULE, jax.random.PRNGKey(0), (2, 4), steps=4, options={"s_churn": 1.0})
    assert "s_churn" in sampler_options("edm") and "order" in sampler_options("unipc_bh2")


def test_guidance_reaches_legacy_and_grid_samplers():
    # uncond = a shifted denoiser; with w = 1 guidance is off, with w != 1 the result moves.
    uncond = lambda x, t: DENOISE(x, t) + 0.1
    for name in ("ddim", "dpmpp_2m"):
        kw = dict(steps=5, spacing="trailing", uncond_fn=uncond)
        base = run_sampler(name, DENOISE, SCHEDULE, jax.random.PRNGKey(2), (8, 4), **kw)[0]
        off = run_sampler(name, DENOISE, SCHEDULE, jax.random.PRNGKey(2), (8, 4), guidance=Guidance(1.0), **kw)[0]
        on = run_sampler(name, DENOISE, SCHEDULE, jax.random.PRNGKey(2), (8, 4), guidance=Guidance(3.0), **kw)[0]
        np.testing.assert_allclose(off, base, atol=1e-6)
        assert float(jnp.abs(on - base).max()) > 1e-3


@pytest.mark.parametrize("name,nfe,expected", [("ddim", 10, (10, 10)), ("heun", 10, (5, 9)), ("plms", 10, (9, 10)),
                                               ("pc", 10, (5, 10)), ("pndm", 20, (11, 20))])
def test_steps_for_nfe_takes_the_most_steps_within_the_budget(name, nfe, expected):
    spacing = SPACING.get(name, "trailing")
    steps, used = steps_for_nfe(name, SCHEDULE, nfe, spacing=spacing)
    assert (steps, used) == expected
    assert count_nfe(name, SCHEDULE, steps + 1, spacing=spacing) > nfe


def test_steps_for_nfe_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="'pndm'.*5 network evaluations.*fewest is 13"):
        steps_for_nfe("pndm", SCHEDULE, 5, spacing="leading")
    with pytest.raises(ValueError, match="adaptive.*rtol"):
        steps_for_nfe("adaptive", SCHEDULE, 10)
