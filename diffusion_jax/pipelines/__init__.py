"""Pipelines: latent text-to-image models run end to end.

  latent.py            make_pipeline: txt2img / img2img / inpaint / outpaint, compiled, any sampler, CFG
  stable_diffusion.py  TextToImage from a diffusers Stable Diffusion folder or its converted form; generate
  trained.py           TextToImage from a latent diffusion run of this project (latent_data.py: its data)
  ddpm_import.py       a diffusers UNet2DModel (google/ddpm-cifar10-32) as a training workdir
  cli.py               the generate and convert commands

Names are imported lazily, so that the command line starts without loading the models.
"""
import importlib

_EXPORTS = {"TASKS": "latent", "LatentPipeline": "latent", "check_context": "latent", "latent_mask": "latent",
            "make_pipeline": "latent", "TextToImage": "stable_diffusion", "generate": "stable_diffusion",
            "load_text_to_image": "stable_diffusion", "convert": "stable_diffusion",
            "load_latent_run": "trained", "convert_unet2d": "ddpm_import"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"diffusion_jax.pipelines.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'diffusion_jax.pipelines' has no attribute {name!r}")
