"""Samplers: pure functions of a denoiser, compiled end to end (one `lax.scan` / `while_loop` each).

One calling convention: every solver, DDPM and DDIM included, runs on a noise-level `Grid` (grid.py) with a
`Denoiser` (wrapper.py):  `solver(denoiser, grid, x_T, key, **options) -> (x, info)`.
`run_sampler(name, denoise_fn, schedule, key, shape, steps=...)` (registry.py) builds both from a process and a
network and runs a solver by name; lookup by name happens only there, at the config boundary. info["nfe"] counts
denoiser evaluations: network evaluations, each two network calls under two-branch classifier-free guidance.
"""
from diffusion_jax.samplers.ddpm import VARIANCES
from diffusion_jax.samplers.grid import SPACINGS, Grid, continuous_grid, discrete_grid
from diffusion_jax.samplers.registry import SAMPLERS, get_sampler, run_sampler, sampler_options
from diffusion_jax.samplers.spacing import StepTables, respace, select_timesteps
from diffusion_jax.samplers.wrapper import Guidance, make_denoiser

__all__ = ["Grid", "Guidance", "SAMPLERS", "SPACINGS", "VARIANCES", "StepTables", "continuous_grid",
           "discrete_grid", "get_sampler", "make_denoiser", "respace", "run_sampler", "sampler_options",
           "select_timesteps"]
