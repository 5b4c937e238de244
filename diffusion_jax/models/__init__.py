"""Networks (NHWC, Flax NNX, used functionally via nnx.split / nnx.merge): the DDPM / ADM U-Net, the cross-attention
U-Net of latent diffusion (diffusers' UNet2DConditionModel layout), the KL autoencoder (AutoencoderKL layout), and
converters from diffusers checkpoints."""

from diffusion_jax.models.convert_diffusers import convert_diffusers_unet, unet_config_from_diffusers
from diffusion_jax.models.convert_unet_cond import convert_unet_cond, load_unet_cond, unet_cond_graphdef
from diffusion_jax.models.convert_vae import convert_vae, load_vae
from diffusion_jax.models.unet import UNet, UNetConfig
from diffusion_jax.models.unet_cond import UNetCond, UNetCondConfig
from diffusion_jax.models.vae import (
    VAE,
    DiagonalGaussian,
    VAEConfig,
    decode,
    encode,
    from_diffusion_latents,
    init_vae,
    make_vae_fns,
    to_diffusion_latents,
    vae_graphdef,
)
from diffusion_jax.models.vae_loss import VAELossConfig, estimate_scaling_factor, psnr, vae_loss

__all__ = ["UNet", "UNetConfig", "convert_diffusers_unet", "unet_config_from_diffusers",
           "UNetCond", "UNetCondConfig", "convert_unet_cond", "load_unet_cond", "unet_cond_graphdef",
           "VAE", "VAEConfig", "DiagonalGaussian", "encode", "decode", "init_vae", "make_vae_fns", "vae_graphdef",
           "to_diffusion_latents", "from_diffusion_latents", "convert_vae", "load_vae",
           "VAELossConfig", "vae_loss", "estimate_scaling_factor", "psnr"]
