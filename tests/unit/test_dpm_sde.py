"""DPM-Solver-SDE (samplers/dpm_sde.py; its step-for-step parity with diffusers' DPMSolverSDEScheduler is in
tests/parity/test_scheduler_configs.py): the Brownian noise pair has the law of one Brownian motion's increments, and
the sampler draws the data law on the exact Gaussian testbed."""
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.samplers import run_sampler
from diffusion_jax.samplers.dpm_sde import brownian_pair
from diffusion_jax.testbed import GaussianMixture, discrete_denoise_fn


def test_brownian_pair_is_one_brownian_motion():
    """z_1, z_2 standard normal with corr sqrt((s - s_mid) / (s - s_next)) (here 0.6): checked on 400k draws."""
    s, s_mid, s_next = 5.0, 3.2, 0.0
    z1, z2 = brownian_pair(jax.random.key(0), 3, s, s_mid, s_next, (400_000,), jnp.float32)
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    assert abs(z1.std() - 1) < 0.005 and abs(z2.std() - 1) < 0.005 and abs(z2.mean()) < 0.005
    assert abs(np.corrcoef(z1, z2)[0, 1] - 0.6) < 0.005
    w = (z2 * np.sqrt(s - s_next) - z1 * np.sqrt(s - s_mid)) / np.sqrt(s_mid - s_next)   # the fresh increment
    assert abs(np.corrcoef(z1, w)[0, 1]) < 0.005


def test_samples_converge_to_the_data_law():
    """On DDPM's linear schedule with Karras levels, from the exact denoiser of N(mu, 0.3^2 I): 20k samples have the
    data's mean to 0.01 and their standard deviation approaches 0.3 as the steps grow (0.284 at 20 steps, 0.297 at 80:
    the statistical error is ~0.002); NFE 2K - 1; fresh keys give fresh samples."""
    mix = GaussianMixture.create([1.0], [[0.4, -0.2]], 0.3)
    sched = make_schedule("linear", 1000)

    def run(steps, key):
        return run_sampler("dpm_sde", discrete_denoise_fn(mix, sched), sched, key, (20_000, 2), steps=steps,
                           spacing="karras")

    errors = []
    for steps in (20, 80):
        x, info = run(steps, jax.random.key(1))
        x = np.asarray(x, np.float64)
        assert int(info["nfe"]) == 2 * steps - 1
        np.testing.assert_allclose(x.mean(0), [0.4, -0.2], atol=0.01)
        errors.append(np.abs(x.std(0) - 0.3).max())
    assert errors[1] < 0.008 and errors[1] < errors[0] / 2, errors
    assert not np.allclose(x, np.asarray(run(80, jax.random.key(2))[0]))
