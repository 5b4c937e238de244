"""Our params as diffusers state_dicts and configs: the inverse of `convert_diffusers` (UNet2DModel),
`convert_unet_cond` (UNet2DConditionModel), `convert_controlnet` (ControlNetModel) and `convert_vae` (AutoencoderKL),
key for key, so that `from_pretrained` loads what this project trained.

    sd, cfg = unet2d_state_dict(params, unet_config), unet2d_config(unet_config)
    sd, cfg = unet_cond_state_dict(params["net"]), unet_cond_diffusers_config(backbone_config.diffusers_config())
    sd, cfg = controlnet_state_dict(params["controlnets"][0]), controlnet_diffusers_config(controlnet_config)
    sd, cfg = vae_state_dict(params, vae_config), vae_diffusers_config(vae_config)
    save_model_folder(folder, cfg, sd)                        # config.json + diffusion_pytorch_model.safetensors

Layouts: our NHWC conv kernels (kh, kw, I, O) become PyTorch's (O, I, kh, kw), Linear kernels (I, O) become (O, I);
norm scales and biases pass unchanged. A class-conditional U-Net keeps its null class (the last embedding row, the
"no label" of classifier-free guidance) as an ordinary class: diffusers' `num_class_embeds` is num_classes + 1 and
label num_classes asks for the unconditional prediction. Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from flax import traverse_util

from diffusion_jax import fileio
from diffusion_jax.models.convert_diffusers import _diffusers_key as unet2d_key
from diffusion_jax.models.convert_diffusers import check_ddpm_unet
from diffusion_jax.models.controlnet import ControlNetConfig
from diffusion_jax.models.convert_controlnet import controlnet_key
from diffusion_jax.models.convert_unet_cond import diffusers_key as unet_cond_key
from diffusion_jax.models.convert_vae import diffusers_key as vae_key
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.models.unet_cond import UNetCondConfig
from diffusion_jax.models.vae import VAEConfig


def torch_layout(value, is_kernel: bool) -> np.ndarray:
    """One of our params in PyTorch's layout (the inverse of `weights_io.torch_to_nhwc`), float32, contiguous."""
    value = np.asarray(value, np.float32)
    if is_kernel:
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return np.ascontiguousarray(value)


def _state_dict(params: dict, key_of) -> dict[str, np.ndarray]:
    return {key_of(path): torch_layout(value, path[-1] == "kernel")
            for path, value in traverse_util.flatten_dict(params).items()}


def check_unet2d(config: UNetConfig) -> None:
    """ValueError naming the first setting of `config` that diffusers' UNet2DModel cannot express."""
    check_ddpm_unet(config)
    widths = [config.channels * m for m in config.channel_mult]
    attended = [w for w, r in zip(widths, config.resolutions) if r in config.attention_resolutions] + [widths[-1]]
    if config.head_dim is None and config.num_heads > 1 and len({w // config.num_heads for w in attended}) != 1:
        raise ValueError(f"model.num_heads={config.num_heads} gives different head widths {sorted(set(attended))} "
                         "at the attention levels; UNet2DModel has one attention_head_dim")


def _block(attn: bool, direction: str, resnet: bool) -> str:
    """A level's UNet2DModel block type: attention or not, resampling by a ResnetBlock2D (`resnet`) or not (a conv,
    or no resampling at the last level)."""
    if attn:
        return f"Attn{direction}Block2D"
    return f"Resnet{direction}sampleBlock2D" if resnet else f"{direction}Block2D"


def unet2d_config(config: UNetConfig) -> dict:
    """The diffusers UNet2DModel config.json of `config` (the inverse of `unet_config_from_diffusers`)."""
    check_unet2d(config)
    widths = [config.channels * m for m in config.channel_mult]
    attn = [r in config.attention_resolutions for r in config.resolutions]
    resnet = config.resblock == "biggan"            # check_ddpm_unet: then without shortcut convs, plain resampling
    return {
        "_class_name": "UNet2DModel", "sample_size": config.image_size, "in_channels": config.in_channels,
        "out_channels": config.resolved_out_channels, "block_out_channels": widths,
        "down_block_types": [_block(a, "Down", resnet and i < len(attn) - 1) for i, a in enumerate(attn)],
        "up_block_types": [_block(a, "Up", resnet and i < len(attn) - 1) for i, a in enumerate(attn[::-1])],
        "layers_per_block": config.num_res_blocks,
        "attention_head_dim": config.head_dim if config.head_dim is not None else (
            None if config.num_heads == 1 else widths[-1] // config.num_heads),
        "norm_num_groups": config.num_groups, "norm_eps": config.norm_eps, "dropout": config.dropout,
        "num_class_embeds": None if config.num_classes is None else config.num_classes + 1,
        "flip_sin_to_cos": config.flip_sin_to_cos, "freq_shift": config.freq_shift,
        "downsample_padding": config.downsample_padding, "act_fn": config.act_fn,
        "time_embedding_type": "positional", "center_input_sample": config.center_input_sample,
        "mid_block_scale_factor": config.mid_block_scale_factor,
        "resnet_time_scale_shift": config.resnet_time_scale_shift, "downsample_type": "resnet" if resnet else "conv",
        "upsample_type": "resnet" if resnet else "conv",
        "add_attention": config.add_attention, "attn_norm_num_groups": config.attn_norm_num_groups,
        "class_embed_type": None,
    }


def unet2d_state_dict(params: dict, config: UNetConfig) -> dict[str, np.ndarray]:
    """The UNet2DModel state_dict of `UNet(config)`'s pure-dict params (names of `convert_diffusers`)."""
    check_unet2d(config)
    return _state_dict(params, unet2d_key)


def vae_diffusers_config(config: VAEConfig, sample_size: int = 32) -> dict:
    """The diffusers AutoencoderKL config.json of `config` (the inverse of `VAEConfig.from_diffusers`); sample_size
    (the image size, which only diffusers' tiled decoding reads) is not part of VAEConfig."""
    n = len(config.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": config.in_channels, "out_channels": config.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
            "act_fn": "silu", "latent_channels": config.latent_channels, "norm_num_groups": config.norm_num_groups,
            "sample_size": sample_size, "scaling_factor": config.scaling_factor, "shift_factor": config.shift_factor,
            "latents_mean": None, "latents_std": None, "force_upcast": True,
            "use_quant_conv": config.use_quant_conv, "use_post_quant_conv": config.use_post_quant_conv,
            "mid_block_add_attention": config.mid_block_add_attention}


def vae_state_dict(params: dict, config: VAEConfig) -> dict[str, np.ndarray]:
    """The AutoencoderKL state_dict of `VAE(config)`'s pure-dict params (names of `convert_vae`)."""
    return _state_dict(params, vae_key)


def save_model_folder(folder: str, config: dict, state_dict: dict[str, np.ndarray]) -> None:
    """Write `folder`/config.json and diffusion_pytorch_model.safetensors (the layout `from_pretrained` reads)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    fileio.write_json(os.path.join(folder, "config.json"), config)
    save_file(state_dict, os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def unet_cond_diffusers_config(config: UNetCondConfig) -> dict:
    """The diffusers UNet2DConditionModel config.json of `config` (the inverse of `UNetCondConfig.from_diffusers`;
    `attention_head_dim` is diffusers' historic name of the head count)."""
    listed = lambda v: list(v) if isinstance(v, tuple) else v   # noqa: E731
    out = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "time_embedding_type": "positional",
           "resnet_time_scale_shift": "default", "attention_type": "default", "only_cross_attention": False}
    for f in dataclasses.fields(config):
        if f.name not in ("num_attention_heads", "dtype"):
            out[f.name] = listed(getattr(config, f.name))
    out["attention_head_dim"] = listed(config.num_attention_heads)
    return out


def unet_cond_state_dict(params: dict) -> dict[str, np.ndarray]:
    """The UNet2DConditionModel state_dict of `UNetCond`'s pure-dict params (names of `convert_unet_cond`)."""
    return _state_dict(params, unet_cond_key)


def controlnet_diffusers_config(config: ControlNetConfig) -> dict:
    """The diffusers ControlNetModel config.json of a ControlNet on a `unet_cond` base (the inverse of
    `convert_controlnet.controlnet_config_from_diffusers`); a `unet` (DDPM / ADM) base has no diffusers layout."""
    if config.base.name != "unet_cond":
        raise ValueError(f"model.base.name={config.base.name!r}: diffusers' ControlNetModel has the layout of "
                         "UNet2DConditionModel; only a ControlNet on a 'unet_cond' base can be exported")
    unet = unet_cond_diffusers_config(config.base.diffusers_config())
    drop = ("_class_name", "out_channels", "up_block_types", "conv_out_kernel", "sample_size", "dropout",
            "time_embedding_type", "attention_type")
    return {"_class_name": "ControlNetModel", **{k: v for k, v in unet.items() if k not in drop},
            "conditioning_channels": config.conditioning_channels,
            "conditioning_embedding_out_channels": list(config.embedding_channels),
            "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False,
            "class_embed_type": None, "addition_embed_type": None}


def controlnet_state_dict(params: dict) -> dict[str, np.ndarray]:
    """The ControlNetModel state_dict of one `ControlNet`'s pure-dict params (names of `convert_controlnet`)."""
    return _state_dict(params, controlnet_key)
