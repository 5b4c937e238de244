"""Samplers: pure functions of a denoiser, `(denoise_fn, schedule, key, shape, *, steps, ...) -> (x, info)`.

Each is one `jax.lax.scan`, so `jax.jit(lambda params, key: ddim_sample(..., steps=50))` compiles end to end.
`SAMPLERS` maps the config name to the function (lookup by name happens only at the config boundary).
"""
from diffusion_jax.samplers.ddim import ddim_sample
from diffusion_jax.samplers.ddpm import VARIANCES, ddpm_sample
from diffusion_jax.samplers.spacing import SPACINGS, StepTables, respace, select_timesteps

SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample}

__all__ = ["SAMPLERS", "SPACINGS", "VARIANCES", "StepTables", "ddim_sample", "ddpm_sample", "respace",
           "select_timesteps"]
