"""Backbones by name, at the config boundary: `model.name` -> the config dataclass of the `model` section, the
network it builds and its kind, which names the objective that trains it (`train.runs.RUN_KINDS`). The train loop,
sharding, checkpoints and samplers never ask which backbone they carry.

    name        kind          config                                     network
    unet        denoiser      unet.UNetConfig                            unet.UNet: DDPM / ADM / NCSN++ U-Net (class
                                                                         labels, cross-attention, learned variance)
    unet_cond   denoiser      unet_cond_backbone.UNetCondBackboneConfig  latent diffusion's UNet2DConditionModel
                                                                         layout (class labels, text context)
    vae         autoencoder   vae.VAEConfig                              latent diffusion's KL autoencoder
                                                                         (AutoencoderKL layout)

A backbone is one file in models/ plus one line below: a frozen config dataclass with `name` and a `validate()`
naming `model.<key>`, and an nnx.Module built as Module(config, rngs=nnx.Rngs). Its kind fixes the rest:
  denoiser     config has `image_size`, `in_channels`, `num_classes`, `context_dim`, `learn_sigma`; the module is
               called as net(x, t, y=None, context=None, *, train=False, dropout_key=None) -> (B, H, W, out channels)
               and trained by a diffusion objective (config.Experiment; `train.loop`).
  autoencoder  the module has encode(x) -> posterior and decode(z) -> x, trained with reconstruction + KL (+ GAN)
               (`train.vae`).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Mapping

from flax import nnx

from diffusion_jax.models.unet import UNet, UNetConfig
from diffusion_jax.models.unet_cond_backbone import UNetCondBackbone, UNetCondBackboneConfig
from diffusion_jax.models.vae import VAE, VAEConfig

KINDS = ("denoiser", "autoencoder")


@dataclasses.dataclass(frozen=True)
class Backbone:
    config: type
    build: Callable[..., nnx.Module]      # build(config, rngs=nnx.Rngs) -> the network
    about: str
    kind: str = "denoiser"                # "denoiser" | "autoencoder" (module docstring)


BACKBONES: dict[str, Backbone] = {
    "unet": Backbone(UNetConfig, UNet, "DDPM / ADM / NCSN++ U-Net (Ho et al. 2020, Dhariwal & Nichol 2021)"),
    "unet_cond": Backbone(UNetCondBackboneConfig, UNetCondBackbone,
                          "UNet2DConditionModel layout (Rombach et al. 2022): spatial transformers, text context"),
    "vae": Backbone(VAEConfig, VAE, "KL autoencoder of latent diffusion (Rombach et al. 2022), AutoencoderKL layout",
                    kind="autoencoder"),
}


def backbone(name) -> Backbone:
    """The registry entry of model.name; ValueError naming the choices (and the closest one)."""
    if name not in BACKBONES:
        close = difflib.get_close_matches(str(name), list(BACKBONES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model.name={name!r} is not a registered backbone {sorted(BACKBONES)}{hint}")
    return BACKBONES[name]


def names_of_kind(kind: str) -> list[str]:
    return sorted(name for name, b in BACKBONES.items() if b.kind == kind)


def config_class(section: Mapping | None) -> type:
    """The dataclass of a `model` config section (a dict; its "name", default "unet")."""
    return backbone((section or {}).get("name", "unet")).config


def build_backbone(config, rngs: nnx.Rngs) -> nnx.Module:
    return backbone(config.name).build(config, rngs=rngs)
