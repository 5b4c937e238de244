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

import math
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
_REQUIRED = {  # key: (accepted values, diffusers default)
    "time_embedding_type": (("positional", "fourier"), "positional"),
    "mid_block_type": (("UNetMidBlock2D",), "UNetMidBlock2D"),
    "class_embed_type": ((None, "timestep", "identity"), None),
}
# The UNetConfig of diffusers' Skip*Block2D (NCSN++): FIR-resampling ResnetBlock2Ds with shortcut convs, residual
# sums (x + h) / sqrt(2), the image pyramids, one attention per up level (downsample_padding: no stride-2 conv)
NCSNPP = {"resblock": "biggan", "resample_filter": "fir", "resample_shortcut": True, "skip_rescale": True,
          "skip_pyramid": True, "up_attention": "last", "downsample_padding": 0}
FOURIER_KEY = "time_proj.weight"        # GaussianFourierProjection's fixed W, our UNetConfig.fourier_weights

RESAMPLE_TYPES = ("conv", "resnet")     # downsample_type / upsample_type: every level the same way
SKIP_TYPES = ("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")   # NCSN++
BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D", "ResnetDownsampleBlock2D",
               "ResnetUpsampleBlock2D") + SKIP_TYPES
# every UNet2DModel block type diffusers ships (get_down_block / get_up_block), for the docs' table
STRUCTURAL = BLOCK_TYPES + ("AttnDownEncoderBlock2D", "DownEncoderBlock2D", "UpDecoderBlock2D",
                            "AttnUpDecoderBlock2D", "KDownBlock2D", "KUpBlock2D")

_MODULES = {  # our module name -> diffusers module name
    "time_embed_1": "time_embedding.linear_1", "time_embed_2": "time_embedding.linear_2",
    "class_embed": "class_embedding", "class_embed_1": "class_embedding.linear_1",
    "class_embed_2": "class_embedding.linear_2", "conv_in": "conv_in", "norm_out": "conv_norm_out",
    "conv_out": "conv_out", "down": "down_blocks", "up": "up_blocks",
    "res": "resnets", "attn": "attentions", "time_proj": "time_emb_proj", "skip": "conv_shortcut",
    "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
}
_PARAMS = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def unet_config_from_diffusers(cfg: Mapping[str, Any], state_dict: Mapping[str, Any] | None = None,
                               **overrides) -> UNetConfig:
    """Build the `UNetConfig` equivalent to a diffusers `UNet2DModel` config dict.

    Raises ValueError for any diffusers setting our architecture does not implement.
    `num_class_embeds` becomes `num_classes`; the converter then appends a zero null-class row.
    state_dict: the model's weights, needed for time_embedding_type "fourier" (its fixed W, `FOURIER_KEY`).
    `overrides` (e.g. dropout=0.1) are applied last.
    """
    cfg = dict(cfg)
    for key, (allowed, default) in _REQUIRED.items():
        if cfg.get(key, default) not in allowed:
            raise ValueError(f"diffusers config {key}={cfg[key]!r} is not supported (one of {allowed})")
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
    class_embed = cfg.get("class_embed_type")
    kwargs = dict(
        image_size=size, in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        channels=ch, channel_mult=tuple(b // ch for b in boc),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_resolutions=tuple(size // 2**i for i in attn_levels), num_heads=min(heads), **per_level,
        dropout=cfg.get("dropout", 0.0), num_groups=groups,
        num_classes=cfg.get("num_class_embeds") if class_embed is None else None, class_embed_type=class_embed,
        **{**{key: cfg.get(key, default) for key, default in _OPTIONS.items()}, **resampling})
    for key in ("freq_shift", "norm_eps", "mid_block_scale_factor"):
        kwargs[key] = float(kwargs[key])
    if cfg.get("time_embedding_type") == "fourier":
        kwargs.update(_fourier(state_dict, ch))
    if kwargs.get("skip_pyramid"):
        _check_ncsnpp(cfg, boc, groups)   # diffusers' ResnetBlock2D (x + h) / sqrt(2) also in the middle block:
        kwargs["mid_block_scale_factor"] /= math.sqrt(2.0)   # ours scales it by 1 / sqrt(2) (skip_rescale) already
    kwargs.update(overrides)
    config = UNetConfig(**kwargs)
    config.validate()
    return config


def _resampling(cfg, down: list, up: list) -> dict:
    """The UNetConfig fields of how the levels resample: every downsampler and upsampler a 3x3 conv (DownBlock2D,
    Attn*Block2D with downsample_type / upsample_type "conv": resblock "ddpm") or every one a ResnetBlock2D(down /
    up) with 2x2 mean / nearest resampling and no shortcut conv (Resnet{Down,Up}sampleBlock2D, Attn* with "resnet":
    resblock "biggan", resample_shortcut False), or the NCSN++ layout when every block is a Skip*Block2D (`NCSNPP`).
    The last down level and the last up level do not resample."""
    skip = {t for t in down + up if t in SKIP_TYPES}
    if skip and not set(down + up) <= set(SKIP_TYPES):
        raise ValueError(f"diffusers blocks {down} / {up} mix Skip*Block2D (NCSN++) with other block types; the "
                         "image pyramids run through every level or none")
    if skip:    # NCSN++: FIR-resampling ResnetBlock2Ds with shortcut convs, (x + h) / sqrt(2), the image pyramids
        return dict(NCSNPP)
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


def _fourier(state_dict, ch: int) -> dict:
    """The UNetConfig fields of diffusers' time_embedding_type "fourier": GaussianFourierProjection(ch, log=True) of
    the noise level with its W from the weights, and the output divided by the noise level."""
    if state_dict is None or FOURIER_KEY not in state_dict:
        raise ValueError(f"diffusers time_embedding_type='fourier' keeps its frequencies W in the weights "
                         f"({FOURIER_KEY!r}); pass the state_dict")
    w = _to_numpy(state_dict[FOURIER_KEY])
    if w.shape != (ch,):
        raise ValueError(f"diffusers {FOURIER_KEY!r} has shape {w.shape}, need ({ch},)")
    return {"time_embedding": "fourier", "fourier_weights": tuple(float(v) for v in w), "fourier_log_input": True,
            "scale_by_sigma": True}


def _check_ncsnpp(cfg, boc: tuple, groups: int) -> None:
    """ValueError unless the Skip*Block2D model is one whose every GroupNorm has norm_num_groups groups: diffusers
    builds those blocks with min(channels // 4, 32) groups (their attentions with 32) and their image convs with 3
    channels."""
    if groups != 32 or min(boc) < 128:
        raise ValueError(f"diffusers Skip*Block2D models are supported with norm_num_groups=32 and every "
                         f"block_out_channels >= 128 (their GroupNorms use min(channels // 4, 32) groups), got "
                         f"norm_num_groups={groups}, block_out_channels={list(boc)}")
    for key in ("in_channels", "out_channels"):
        if cfg.get(key, 3) != 3:
            raise ValueError(f"diffusers Skip*Block2D models have 3-channel image pyramids; {key}={cfg[key]}")


def check_ddpm_unet(config: UNetConfig, importing: bool = False) -> None:
    """ValueError naming the first setting of `config` that a diffusers UNet2DModel lacks: cross-attention or a
    score_sde option. importing: also allow what `unet_config_from_diffusers` builds from the NCSN++ layout
    (Skip*Block2D: `NCSNPP`), the Fourier time embedding (output / sigma) and class_embed_type, which the export
    (`export_diffusers`) does not write."""
    if config.context_dim is not None:
        raise ValueError(f"model.context_dim={config.context_dim}: UNet2DModel has no cross-attention; use a config "
                         "with model.context_dim=None")
    default = UNetConfig()
    fourier = config.time_embedding == "fourier"
    if importing and (fourier != config.scale_by_sigma or (fourier and not config.fourier_log_input)):
        raise ValueError("diffusers' time_embedding_type='fourier' embeds log(sigma) and divides the output by "
                         f"sigma; model.time_embedding={config.time_embedding!r} with model.scale_by_sigma="
                         f"{config.scale_by_sigma}, model.fourier_log_input={config.fourier_log_input} differs")
    if importing and config.skip_pyramid:
        for name, value in NCSNPP.items():
            if getattr(config, name) != value:
                raise ValueError(f"model.{name}={getattr(config, name)!r}: diffusers' Skip*Block2D (model.skip_pyramid"
                                 f"=True) need {value!r}")
        return
    names = ("resample_filter", "skip_rescale", "skip_pyramid", "up_attention")
    for name in names + (() if importing else ("time_embedding", "scale_by_sigma", "class_embed_type")):
        if getattr(config, name) != getattr(default, name):
            raise ValueError(f"model.{name}={getattr(config, name)!r} has no diffusers UNet2DModel counterpart "
                             f"{'in these blocks' if importing else 'that the export writes'} "
                             f"(need {getattr(default, name)!r})")
    if config.resblock == "biggan" and config.resample_shortcut:
        raise ValueError("model.resblock='biggan' with model.resample_shortcut=True (score_sde's) has no diffusers "
                         "UNet2DModel counterpart; its Resnet*sampleBlock2D resample without a shortcut conv")


def _diffusers_key(path: tuple, skip_blocks: bool = False) -> str:
    """('down', 1, 'res', 0, 'conv1', 'kernel') -> 'down_blocks.1.resnets.0.conv1.weight'. skip_blocks: a level's
    resampling ResBlock is Skip*Block2D's resnet_down / resnet_up (not downsamplers.0 / upsamplers.0)."""
    *mods, param = path
    if mods[0] in ("mid_res1", "mid_res2", "mid_attn"):
        kind, idx = ("resnets", mods[0][-1]) if mods[0] != "mid_attn" else ("attentions", "1")
        mods = ["mid_block", kind, str(int(idx) - 1), *mods[1:]]
    out = []
    for i, m in enumerate(mods):
        if m == "resample" and skip_blocks:
            out.append("resnet_down" if mods[0] == "down" else "resnet_up")
        elif m == "resample":
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
    check_ddpm_unet(config, importing=True)
    abstract = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
    _, params = nnx.split(abstract, nnx.Param)
    sd = {k: v for k, v in state_dict.items()}
    used, flat = set(), []
    if config.fourier_weights is not None and FOURIER_KEY in sd:   # a constant of the config, not a Param
        if not np.array_equal(_to_numpy(sd[FOURIER_KEY]), np.asarray(config.fourier_weights, np.float32)):
            raise ValueError(f"diffusers {FOURIER_KEY!r} differs from the config's fourier_weights")
        used.add(FOURIER_KEY)
    for path, var in nnx.to_flat_state(params):
        key = _diffusers_key(path, config.skip_pyramid)
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
