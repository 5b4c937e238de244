"""Denoiser networks (NHWC, Flax NNX, used functionally via nnx.split / nnx.merge)."""

from diffusion_jax.models.convert_diffusers import convert_diffusers_unet, unet_config_from_diffusers
from diffusion_jax.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "convert_diffusers_unet", "unet_config_from_diffusers"]
