"""Convert a diffusers `UNet2DModel` (DDPM layout) into `UNet` params.

The DDPM weights released by Ho et al. 2020 are published by diffusers as `google/ddpm-cifar10-32`
(and the LSUN / CelebA-HQ models) in `UNet2DModel` form; UNet2DModels at diffusers' defaults (cos-first time
embedding, shift 0, symmetric downsampling padding, GroupNorm eps 1e-5: what diffusers' unconditional training
example saves) convert too, through the UNetConfig fields of the same names. This module maps such a state_dict
(torch tensors or numpy arrays; NCHW conv kernels (O, I, kh, kw), Linear weights (O, I)) onto our
NHWC `nnx.Param` State (conv kernels (kh, kw, I, O), Linear kernels (I, O)). Nothing here imports
torch or diffusers.

    config = unet_config_from_diffusers(json.load(open("unet/config.json")))
    params = convert_diffusers_unet(state_dict, config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))), nnx.Param)
    model = nnx.merge(graphdef, params)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.unet import UNet, UNetConfig

# Diffusers settings our UNet implements (DDPM's), with the value diffusers assumes when absent.
# Diffusers settings with a UNetConfig field of the same name, with diffusers' default.
_OPTIONS = {"flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "norm_eps": 1e-5, "act_fn": "silu",
            "resnet_time_scale_shift": "default", "center_input_sample": False, "mid_block_scale_factor": 1,
            "add_attention": True, "attn_norm_num_groups": None}
# Diffusers settings our UNet implements only at one value, with the value diffusers assumes when absent.
_REQUIRED = {  # key: (required value, diffusers default)
    "time_embedding_type": ("positional", "positional"),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "class_embed_type": (None, None),
}

RESAMPLE_TYPES = ("conv", "resnet")     # downsample_type / upsample_type: every level the same way
BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D", "ResnetDownsampleBlock2D",
               "ResnetUpsampleBlock2D")
# every UNet2DModel block type diffusers ships (get_down_block / get_up_block), for the docs' table
STRUCTURAL = BLOCK_TYPES + ("SkipDownBlock2D",
                            "AttnSkipDownBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "AttnDownEncoderBlock2D",
                            "DownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D", "KDownBlock2D",
                            "KUpBlock2D")

_MODULES = {  # our module name -> diffusers module name
    "time_embed_1": "time_embedding.linear_1", "time_embed_2": "time_embedding.linear_2",
    "class_embed": "class_embedding", "conv_in": "conv_in", "norm_out": "conv_norm_out",
    "conv_out": "conv_out", "down": "down_blocks", "up": "up_blocks",
    "res": "resnets", "attn": "attentions", "time_proj": "time_emb_proj", "skip": "conv_shortcut",
    "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
}
_PARAMS = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def unet_config_from_diffusers(cfg: Mapping[str, Any], **overrides) -> UNetConfig:
    """Build the `UNetConfig` equivalent to a diffusers `UNet2DModel` config dict.

    Raises ValueError for any diffusers setting our (DDPM) architecture does not implement.
    `num_class_embeds` becomes `num_classes`; the converter then appends a zero null-class row.
    `overrides` (e.g. dropout=0.1) are applied last.
    """
    cfg = dict(cfg)
    for key, (want, default) in _REQUIRED.items():
        got = cfg.get(key, default)
        if got != want and not (isinstance(want, float) and np.isclose(got, want, rtol=1e-3, atol=0)):
            raise ValueError(f"diffusers config {key}={got!r} is not supported (need {want!r})")
    boc = tuple(cfg.get("block_out_channels", (224, 448, 672, 896)))
    ch = boc[0]
    if any(b % ch for b in boc):
        raise ValueError(f"diffusers block_out_channels={boc} are not multiples of the first")
    if cfg.get("time_embedding_dim") not in (None, 4 * ch):
        raise ValueError(f"diffusers time_embedding_dim={cfg['time_embedding_dim']} must be 4 * {ch}")
    groups = cfg.get("norm_num_groups", 32)
    if (cfg.get("resnet_time_scale_shift") == "scale_shift" and cfg.get("attn_norm_num_groups") is None
            and cfg.get("add_attention", True)):
        raise ValueError("diffusers resnet_time_scale_shift='scale_shift' with attn_norm_num_groups=None has a "
                         "middle-block attention without GroupNorm, which is not supported; set attn_norm_num_groups")
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"diffusers sample_size={size} must be square")
        size = size[0]
    down = list(cfg["down_block_types"])
    up = list(cfg["up_block_types"])
    known = set(BLOCK_TYPES)
    if not set(down + up) <= known:
        raise ValueError(f"diffusers block types {sorted(set(down + up) - known)} are not supported")
    attn_levels = [i for i, t in enumerate(down) if t.startswith("Attn")]
    resampling = _resampling(cfg, down, up)
    if [len(up) - 1 - i for i, t in enumerate(up) if t.startswith("Attn")][::-1] != attn_levels:
        raise ValueError(f"diffusers up_block_types={up} do not mirror down_block_types={down}")
    head_dim = cfg.get("attention_head_dim", 8)
    heads = {1 if head_dim is None else boc[i] // head_dim for i in attn_levels + [len(boc) - 1]}
    per_level = {"head_dim": head_dim} if len(heads) > 1 else {}   # diffusers: heads = channels // head_dim
    kwargs = dict(
        image_size=size, in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        channels=ch, channel_mult=tuple(b // ch for b in boc),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_resolutions=tuple(size // 2**i for i in attn_levels), num_heads=min(heads), **per_level,
        dropout=cfg.get("dropout", 0.0), num_groups=groups, num_classes=cfg.get("num_class_embeds"),
        **{**{key: cfg.get(key, default) for key, default in _OPTIONS.items()}, **resampling})
    for key in ("freq_shift", "norm_eps", "mid_block_scale_factor"):
        kwargs[key] = float(kwargs[key])
    kwargs.update(overrides)
    config = UNetConfig(**kwargs)
    config.validate()
    return config


def _resampling(cfg, down: list, up: list) -> dict:
    """The UNetConfig fields of how the levels resample: every downsampler and upsampler a 3x3 conv (DownBlock2D,
    Attn*Block2D with downsample_type / upsample_type "conv": resblock "ddpm") or every one a ResnetBlock2D(down /
    up) with 2x2 mean / nearest resampling and no shortcut conv (Resnet{Down,Up}sampleBlock2D, Attn* with "resnet":
    resblock "biggan", resample_shortcut False). The last down level and the last up level do not resample."""
    kinds = set()
    for types, key in ((down, "downsample_type"), (up, "upsample_type")):
        for t in types[:-1]:
            attn_kind = cfg.get(key) or "conv"         # Attn*Block2D resample as downsample_type / upsample_type
            kinds.add("resnet" if t.startswith("Resnet") else attn_kind if t.startswith("Attn") else "conv")
    if not kinds <= set(RESAMPLE_TYPES):
        raise ValueError(f"diffusers downsample_type / upsample_type {sorted(kinds - set(RESAMPLE_TYPES))} are not "
                         f"supported (need one of {RESAMPLE_TYPES})")
    if len(kinds) > 1:
        raise ValueError(f"diffusers blocks {down} / {up} with downsample_type={cfg.get('downsample_type')!r}, "
                         f"upsample_type={cfg.get('upsample_type')!r} mix conv and resnet resampling; the U-Net "
                         "resamples every level one way")
    if kinds == {"resnet"}:                 # downsample_padding pads a stride-2 conv these models do not have
        return {"resblock": "biggan", "resample_shortcut": False, "downsample_padding": 0}
    return {}


def check_ddpm_unet(config: UNetConfig) -> None:
    """ValueError naming the first setting of `config` that UNet2DModel (the DDPM U-Net) lacks: cross-attention or
    a score_sde option. Shared by the import here and the export (`export_diffusers`)."""
    if config.context_dim is not None:
        raise ValueError(f"model.context_dim={config.context_dim}: UNet2DModel has no cross-attention; use a config "
                         "with model.context_dim=None")
    default = UNetConfig()
    if config.resblock == "biggan" and config.resample_shortcut:
        raise ValueError("model.resblock='biggan' with model.resample_shortcut=True (score_sde's) has no diffusers "
                         "UNet2DModel counterpart; its Resnet*sampleBlock2D resample without a shortcut conv")
    for name in ("time_embedding", "resample_filter", "skip_rescale"):   # score_sde options
        if getattr(config, name) != getattr(default, name):
            raise ValueError(f"model.{name}={getattr(config, name)!r} has no diffusers UNet2DModel counterpart "
                             f"(UNet2DModel is the DDPM U-Net: need {getattr(default, name)!r})")


def _diffusers_key(path: tuple) -> str:
    """('down', 1, 'res', 0, 'conv1', 'kernel') -> 'down_blocks.1.resnets.0.conv1.weight'."""
    *mods, param = path
    if mods[0] in ("mid_res1", "mid_res2", "mid_attn"):
        kind, idx = ("resnets", mods[0][-1]) if mods[0] != "mid_attn" else ("attentions", "1")
        mods = ["mid_block", kind, str(int(idx) - 1), *mods[1:]]
    out = []
    for i, m in enumerate(mods):
        if m == "resample":
            out.append("downsamplers.0" if mods[0] == "down" else "upsamplers.0")
        else:
            out.append(_MODULES.get(m, str(m)) if not isinstance(m, int) else str(m))
    return ".".join(out + [_PARAMS[param]])


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def convert_diffusers_unet(state_dict: Mapping[str, Any], config: UNetConfig) -> nnx.State:
    """Map a diffusers `UNet2DModel` state_dict onto the `nnx.Param` State of `UNet(config)`.

    Args:
      state_dict: diffusers parameter names -> torch tensors or numpy arrays.
      config: the matching `UNetConfig` (see `unet_config_from_diffusers`).
    Returns:
      State with the structure of `nnx.split(UNet(config, ...), nnx.Param)[1]`, float32 jax arrays.
    Raises:
      ValueError on missing / unused keys or shape mismatches.
    """
    check_ddpm_unet(config)
    abstract = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
    _, params = nnx.split(abstract, nnx.Param)
    sd = {k: v for k, v in state_dict.items()}
    used, flat = set(), []
    for path, var in nnx.to_flat_state(params):
        key = _diffusers_key(path)
        if key not in sd:
            raise ValueError(f"diffusers state_dict has no {key!r} (needed for {'/'.join(map(str, path))})")
        value = _to_numpy(sd[key])
        used.add(key)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
        elif value.ndim == 2 and path[-1] == "kernel":
            value = value.T  # Linear (O, I) -> (I, O)
        elif path[-1] == "embedding" and value.shape[0] == config.num_classes:
            value = np.concatenate([value, np.zeros_like(value[:1])])  # append the null class
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{key}: converted shape {value.shape} != expected {tuple(var.shape)}")
        flat.append((path, var.replace(jnp.asarray(value))))
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"diffusers state_dict keys not used by UNet{config}: {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")
    return nnx.from_flat_state(flat)
