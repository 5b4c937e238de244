"""diffusion_jax: diffusion models in JAX / Flax NNX, built for ablations and sampler comparisons.

Layout: schedules (forward process), param (eps / x0 / v / score), losses, models (NNX U-Net),
data, train (pure jitted step, orbax checkpoints), samplers (pure functions of a denoiser), cli.
"""

__version__ = "0.1.0"
