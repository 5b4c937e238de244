"""Backbones by name, at the config boundary: `model.name` -> the config dataclass of the `model` section and the
network it builds. The train loop, sharding, checkpoints and samplers never ask which backbone they carry.

    name        config                                     network
    unet        unet.UNetConfig                            unet.UNet: DDPM / ADM / NCSN++ U-Net (class labels,
                                                           cross-attention, learned variance)
    unet_cond   unet_cond_backbone.UNetCondBackboneConfig  latent diffusion's UNet2DConditionModel layout (class
                                                           labels, text context)

A backbone is one file in models/ (a frozen config dataclass with `name`, `image_size`, `in_channels`,
`num_classes`, `context_dim`, `learn_sigma` and a `validate()` naming `model.<key>`; an nnx.Module called as
net(x, t, y=None, context=None, *, train=False, dropout_key=None) -> (B, H, W, out channels)) plus one line below.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Mapping

from flax import nnx

from diffusion_jax.models.unet import UNet, UNetConfig
from diffusion_jax.models.unet_cond_backbone import UNetCondBackbone, UNetCondBackboneConfig


@dataclasses.dataclass(frozen=True)
class Backbone:
    config: type
    build: Callable[..., nnx.Module]      # build(config, rngs=nnx.Rngs) -> the network
    about: str


BACKBONES: dict[str, Backbone] = {
    "unet": Backbone(UNetConfig, UNet, "DDPM / ADM / NCSN++ U-Net (Ho et al. 2020, Dhariwal & Nichol 2021)"),
    "unet_cond": Backbone(UNetCondBackboneConfig, UNetCondBackbone,
                          "UNet2DConditionModel layout (Rombach et al. 2022): spatial transformers, text context"),
}


def backbone(name) -> Backbone:
    """The registry entry of model.name; ValueError naming the choices (and the closest one)."""
    if name not in BACKBONES:
        close = difflib.get_close_matches(str(name), list(BACKBONES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model.name={name!r} is not a registered backbone {sorted(BACKBONES)}{hint}")
    return BACKBONES[name]


def config_class(section: Mapping | None) -> type:
    """The dataclass of a `model` config section (a dict; its "name", default "unet")."""
    return backbone((section or {}).get("name", "unet")).config


def build_backbone(config, rngs: nnx.Rngs) -> nnx.Module:
    return backbone(config.name).build(config, rngs=rngs)
