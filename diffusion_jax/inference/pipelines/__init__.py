"""Pipelines: latent text-to-image models run end to end.

  latent.py            make_pipeline: txt2img / img2img / inpaint / outpaint, compiled, any sampler, CFG
  stable_diffusion.py  TextToImage from a diffusers Stable Diffusion folder or its converted form; generate

A latent diffusion run of this project loads as the same TextToImage with `train.latent` (its data:
`train.latent_data`); a diffusers UNet2DModel becomes a training workdir with `train.ddpm_import`; the generate and
convert commands are `cli.pipelines`.

Names are imported lazily, so that the command line starts without loading the models.
"""
import importlib

_EXPORTS = {"TASKS": "latent", "LatentPipeline": "latent", "check_context": "latent", "latent_mask": "latent",
            "make_pipeline": "latent", "TextToImage": "stable_diffusion", "generate": "stable_diffusion",
            "load_text_to_image": "stable_diffusion", "convert": "stable_diffusion"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"diffusion_jax.inference.pipelines.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'diffusion_jax.inference.pipelines' has no attribute {name!r}")
