"""Pipelines: a trained or imported latent text-to-image model run end to end (`latent.py`)."""
from diffusion_jax.pipelines.latent import TASKS, LatentPipeline, check_context, latent_mask, make_pipeline

__all__ = ["TASKS", "LatentPipeline", "check_context", "latent_mask", "make_pipeline"]
