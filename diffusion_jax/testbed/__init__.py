"""Exact-score testbed: a Gaussian mixture whose noised marginals, scores and denoisers are closed form,
so samplers run with no training and are measured against exact answers (PF-ODE ground truth, MMD, W2).

    mix = GaussianMixture.random(jax.random.key(0), num_components=8, dim=64)
    denoise_fn = discrete_denoise_fn(mix, make_schedule("linear", 1000), "eps")
    x, info = run_sampler("ddim", denoise_fn, schedule, key, (256, 64), steps=50)
    mixture_mmd2(mix, x, bandwidth=1.0), gaussian_w2(mix, x)

`reference_ode_solution` needs diffrax (imported on first use).
"""
from diffusion_jax.testbed.metrics import gaussian_w2, mean_log_likelihood, mixture_mmd2, mixture_moments, moment_errors
from diffusion_jax.testbed.mixture import (GaussianMixture, alpha_sigma_denoiser, discrete_denoise_fn, edm_denoiser,
                                           process_denoise_fn)
from diffusion_jax.testbed.reference import reference_ode_solution, single_gaussian_pf_ode

__all__ = ["GaussianMixture", "alpha_sigma_denoiser", "discrete_denoise_fn", "edm_denoiser", "process_denoise_fn",
           "gaussian_w2", "mean_log_likelihood", "mixture_mmd2", "mixture_moments", "moment_errors",
           "reference_ode_solution", "single_gaussian_pf_ode"]
