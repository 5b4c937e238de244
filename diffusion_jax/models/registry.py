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
    controlnet  denoiser      controlnet.ControlNetConfig                controlnet.ControlledUNet: a locked unet /
                                                                         unet_cond + trainable ControlNet copies
    lora        denoiser      lora.LoRAConfig                            lora.LoRAUNet: a locked unet / unet_cond +
                                                                         trainable low-rank updates of its projections
    dit         denoiser      dit.DiTConfig                              dit.DiT: the Diffusion Transformer (patches,
                                                                         adaLN-Zero; Peebles & Xie 2023)
    uvit        denoiser      uvit.UViTConfig                            uvit.UViT: time, label and patches as tokens
                                                                         of a ViT with long skips (Bao et al. 2023)
    dreambooth  denoiser      dreambooth.DreamBoothConfig                a class-conditional unet / unet_cond with one
                                                                         more label (the subject), all of it trained

A backbone is one file in models/ plus one line below: a frozen config dataclass with `name` and a `validate()`
naming `model.<key>`, and an nnx.Module built as Module(config, rngs=nnx.Rngs). Its kind fixes the rest:
  denoiser     config has `image_size`, `in_channels`, `num_classes`, `context_dim`, `learn_sigma`; the module is
               called as net(x, t, y=None, context=None, *, train=False, dropout_key=None) -> (B, H, W, out channels)
               and trained by a diffusion objective (config.Experiment; `train.loop`).
  autoencoder  the module has encode(x) -> posterior and decode(z) -> x, trained with reconstruction + KL (+ GAN)
               (`train.vae`).
A backbone that adapts a trained network (ControlNet; LoRA; DreamBooth) adds hooks the train loop calls without
asking which backbone it holds: `pretrained(config, params, load_params) -> params` fills fresh params from trained
runs (load_params(workdir) -> that run's EMA params), and `trainable(path) -> bool` names the params the optimizer
updates (the rest stay bit-identical: no gradient, no update, no EMA drift; None: all train).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Mapping

from flax import nnx

from diffusion_jax.models import controlnet, dreambooth, lora
from diffusion_jax.models.dit import DiT, DiTConfig
from diffusion_jax.models.uvit import UViT, UViTConfig
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
    pretrained: Callable | None = None    # (config, params, load_params) -> params (module docstring)
    trainable: Callable[[tuple], bool] | None = None   # key path of a param -> trained? (None: all are)


BACKBONES: dict[str, Backbone] = {
    "unet": Backbone(UNetConfig, UNet, "DDPM / ADM / NCSN++ U-Net (Ho et al. 2020, Dhariwal & Nichol 2021)"),
    "unet_cond": Backbone(UNetCondBackboneConfig, UNetCondBackbone,
                          "UNet2DConditionModel layout (Rombach et al. 2022): spatial transformers, text context"),
    "dit": Backbone(DiTConfig, DiT, "DiT (Peebles & Xie 2023): a transformer on patches, adaLN-Zero conditioning"),
    "uvit": Backbone(UViTConfig, UViT, "U-ViT (Bao et al. 2023): time, label and patches as tokens, long skips"),
    "vae": Backbone(VAEConfig, VAE, "KL autoencoder of latent diffusion (Rombach et al. 2022), AutoencoderKL layout",
                    kind="autoencoder"),
    "controlnet": Backbone(controlnet.ControlNetConfig, controlnet.ControlledUNet,
                           "ControlNet (Zhang et al. 2023) on a trained unet / unet_cond: zero-conv residuals",
                           pretrained=controlnet.pretrained, trainable=controlnet.trainable),
    "lora": Backbone(lora.LoRAConfig, lora.LoRAUNet, "LoRA (Hu et al. 2021) on a trained unet / unet_cond: W + (alpha/r) A B",
                     pretrained=lora.pretrained, trainable=lora.trainable),
    "dreambooth": Backbone(dreambooth.DreamBoothConfig, dreambooth.DreamBoothUNet,
                           "DreamBooth (Ruiz et al. 2023): a trained class-conditional U-Net fine-tuned on one subject, "
                           "bound to a new label", pretrained=dreambooth.pretrained),
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
