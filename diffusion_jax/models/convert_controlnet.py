"""Convert a diffusers `ControlNetModel` (state_dict + config.json) into the params of this project's `ControlNet`
(models/controlnet.py) over a `unet_cond` base: the encoder copy is `UNetCond`'s down and mid blocks, so diffusers'
names map one to one ("encoder.net." dropped; controlnet_cond_embedding, controlnet_down_blocks and
controlnet_mid_block keep theirs).

    config, params = load_controlnet("lllyasviel/sd-controlnet-canny")    # ControlNetConfig, ControlNet params
    down, mid = nnx.merge(controlnet_graphdef(config), params)(x, t, None, context, control, 1.0)

The ControlNetConfig's `base` is the project's `unet_cond` section that describes the same encoder (Stable Diffusion
1.x ControlNets are expressible); a diffusers option it cannot express is refused by name, as are the ControlNet
options not implemented (bgr channel order, global pooling, added embeddings).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from diffusion_jax.models.controlnet import ControlNet, ControlNetConfig
from diffusion_jax.models.convert_unet_cond import abstract_flat, diffusers_key, map_state_dict
from diffusion_jax.models.unet_cond import UNetCondConfig
from diffusion_jax.models.unet_cond_backbone import UNetCondBackboneConfig
from diffusion_jax.models.weights_io import read_model_folder

# ControlNetModel options that change the numbers and are not implemented: key -> the accepted value(s)
_REFUSED = {"controlnet_conditioning_channel_order": ("rgb",), "global_pool_conditions": (False,),
            "class_embed_type": (None,), "addition_embed_type": (None,), "encoder_hid_dim": (None,),
            "encoder_hid_dim_type": (None,), "projection_class_embeddings_input_dim": (None,)}
_UNUSED = ("addition_time_embed_dim", "addition_embed_type_num_heads", "num_attention_heads")
# UNetCondConfig fields the encoder reads (the decoder's up_block_types, out_channels, conv_out_kernel are not)
_ENCODER_FIELDS = ("in_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift", "down_block_types",
                   "mid_block_type", "block_out_channels", "layers_per_block", "downsample_padding",
                   "mid_block_scale_factor", "norm_num_groups", "norm_eps", "cross_attention_dim",
                   "transformer_layers_per_block", "use_linear_projection", "num_class_embeds", "upcast_attention",
                   "time_embedding_dim", "conv_in_kernel", "num_attention_heads")


PER_BLOCK = ("layers_per_block", "num_attention_heads", "transformer_layers_per_block")


def unet_differences(a: UNetCondConfig, b: UNetCondConfig, fields) -> list[tuple[str, Any, Any]]:
    """(field, a's value, b's value) for each of `fields` where the two configs differ; the per-block fields are
    compared block by block (8 and (8, 8) agree)."""
    out = []
    for name in fields:
        x, y = (a.per_block(name), b.per_block(name)) if name in PER_BLOCK else (getattr(a, name), getattr(b, name))
        if x != y:
            out.append((name, x, y))
    return out


def controlnet_config_from_diffusers(cfg: Mapping[str, Any], sample_size: int = 64) -> ControlNetConfig:
    """The ControlNetConfig of a diffusers ControlNetModel config.json. sample_size: the latent size its base runs
    at (Stable Diffusion 1.x: 64), which places `attention_resolutions`; the network itself takes any size."""
    cfg = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    for key, allowed in _REFUSED.items():
        if cfg.get(key, allowed[0]) not in allowed:
            raise ValueError(f"diffusers ControlNetModel config {key}={cfg[key]!r} is not supported (the project's "
                             f"ControlNet implements {allowed[0]!r})")
        cfg.pop(key, None)
    heads = cfg.pop("num_attention_heads", None)
    if heads is not None:   # diffusers: num_attention_heads or attention_head_dim (the head count, issue 2011)
        cfg["attention_head_dim"] = heads
    for key in _UNUSED:
        cfg.pop(key, None)
    conditioning_channels = cfg.pop("conditioning_channels", 3)
    embedding = tuple(cfg.pop("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    down = [str(t) for t in cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])]
    cfg["down_block_types"] = down
    cfg["up_block_types"] = ["UpBlock2D" if "CrossAttn" not in t else "CrossAttnUpBlock2D" for t in reversed(down)]
    unet = UNetCondConfig.from_diffusers({**cfg, "sample_size": sample_size})
    base = _backbone_section(unet, sample_size)
    for name, a, b in unet_differences(base.diffusers_config(), unet, _ENCODER_FIELDS)[:1]:
        raise ValueError(f"diffusers ControlNetModel config {name}={b!r} cannot be expressed by the project's "
                         f"unet_cond backbone (it would give {a!r})")
    return ControlNetConfig(base=base, condition=None, conditioning_channels=int(conditioning_channels),
                            embedding_channels=embedding)


def _backbone_section(unet: UNetCondConfig, sample_size: int) -> UNetCondBackboneConfig:
    boc = unet.block_out_channels
    if any(c % boc[0] for c in boc):
        raise ValueError(f"diffusers ControlNetModel config block_out_channels={list(boc)} are not multiples of the "
                         "first (the unet_cond backbone writes them as channels * channel_mult)")
    per = lambda name: unet.per_block(name)   # noqa: E731
    for name in ("layers_per_block", "num_attention_heads", "transformer_layers_per_block"):
        if len(set(per(name))) != 1:
            raise ValueError(f"diffusers ControlNetModel config {name}={list(per(name))}: per-block values cannot be "
                             "expressed by the project's unet_cond backbone (one value for every block)")
    attention = tuple(sample_size // 2**i for i, t in enumerate(unet.down_block_types) if t == "CrossAttnDownBlock2D")
    return UNetCondBackboneConfig(
        image_size=sample_size, in_channels=unet.in_channels, channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=per("layers_per_block")[0],
        attention_resolutions=attention, num_heads=per("num_attention_heads")[0],
        transformer_layers=per("transformer_layers_per_block")[0], dropout=float(unet.dropout),
        num_groups=unet.norm_num_groups, context_dim=unet.cross_attention_dim if unet.has_cross_attention else None,
        num_classes=None if unet.num_class_embeds is None else unet.num_class_embeds - 1, dtype=unet.dtype)


def controlnet_key(path: tuple) -> str:
    """('encoder', 'net', 'down_blocks', 0, ...) -> 'down_blocks.0....'; the ControlNet's own layers keep their names
    ('controlnet_cond_embedding', 'blocks', 1, 'kernel') -> 'controlnet_cond_embedding.blocks.1.weight'."""
    return diffusers_key(path[2:] if path[:2] == ("encoder", "net") else path)


def _abstract(config: ControlNetConfig):
    return abstract_flat(ControlNet, config)


def controlnet_graphdef(config: ControlNetConfig):
    """The graphdef of `ControlNet(config)`, to `nnx.merge` with converted params."""
    return _abstract(config)[0]


def convert_controlnet(state_dict: Mapping[str, Any], config: ControlNetConfig) -> dict:
    """A diffusers ControlNetModel state_dict as the params (pure dict) of `ControlNet(config)`; ValueError naming
    missing or unexpected keys and shape mismatches."""
    return map_state_dict(state_dict, _abstract(config)[1], controlnet_key, f"ControlNet({config.base})")


def load_controlnet(folder, *, sample_size: int = 64, **base_overrides) -> tuple[ControlNetConfig, dict]:
    """(config, params) of a diffusers ControlNetModel folder (config.json + safetensors or .bin), or of the
    `controlnet/` subfolder of a pipeline folder. base_overrides (e.g. dtype="bfloat16") go to config.base."""
    raw, state_dict = read_model_folder(folder, "controlnet", "ControlNetModel")
    config = controlnet_config_from_diffusers(raw, sample_size)
    if base_overrides:
        config = dataclasses.replace(config, base=dataclasses.replace(config.base, **base_overrides))
    return config, convert_controlnet(state_dict, config)
