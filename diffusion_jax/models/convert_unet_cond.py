"""Convert a diffusers `UNet2DConditionModel` (state_dict + config.json) into `UNetCond` params.

`UNetCond` mirrors diffusers' module names, so a parameter path joined with "." is the diffusers key, up to
`kernel` / `scale` / `embedding` -> `weight` and the feed-forward's `ff.proj` / `ff.out` -> `ff.net.0.proj` /
`ff.net.2`. Values: conv kernels (O, I, kh, kw) -> (kh, kw, I, O), Linear weights (O, I) -> (I, O); torch
tensors or numpy arrays. Nothing here imports torch, except `load_unet_cond` for a `.bin` file (and only when
no safetensors file is there).

    config, params = load_unet_cond("stable-diffusion-v1-5/unet")   # config.json + diffusion_pytorch_model.*
    graphdef = unet_cond_graphdef(config)
    eps = functional.make_apply_fn(graphdef)(params, x, t, None, context)
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.unet_cond import UNetCond, UNetCondConfig
from diffusion_jax.models.weights_io import listing, read_model_folder, to_numpy, torch_to_nhwc

_PARAMS = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_RENAME = {".ff.proj.": ".ff.net.0.proj.", ".ff.out.": ".ff.net.2."}


def diffusers_key(path: tuple) -> str:
    """('down_blocks', 0, 'attentions', 1, 'transformer_blocks', 0, 'ff', 'proj', 'kernel')
    -> 'down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight'."""
    *mods, param = path
    key = ".".join([str(m) for m in mods] + [_PARAMS[param]])
    for ours, theirs in _RENAME.items():
        key = key.replace(ours, theirs)
    return key




@functools.lru_cache(maxsize=16)
def abstract_flat(build, config):
    """(graphdef, ((path, abstract nnx.Param), ...)) of `build(config, rngs=...)` (a module class), without
    allocating; cached per (class, config)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0))), nnx.Param)
    return graphdef, tuple(nnx.to_flat_state(abstract))


def _abstract(config: UNetCondConfig):
    return abstract_flat(UNetCond, config)


def unet_cond_graphdef(config: UNetCondConfig):
    """The graphdef to `nnx.merge` with converted params (or to give `functional.make_apply_fn`)."""
    return _abstract(config)[0]


def convert_unet_cond(state_dict: Mapping[str, Any], config: UNetCondConfig) -> dict:
    """Map a diffusers `UNet2DConditionModel` state_dict onto the params (pure dict) of `UNetCond(config)`.

    Raises ValueError naming missing keys, unexpected keys, or a shape mismatch (with both shapes).
    """
    return map_state_dict(state_dict, _abstract(config)[1], diffusers_key, f"UNetCond({config})")


def map_state_dict(state_dict: Mapping[str, Any], abstract_flat, key_of, what: str) -> dict:
    """The params (pure dict) of a module whose flat abstract state is `abstract_flat` ((path, nnx.Param) pairs),
    read from a diffusers state_dict: key_of(path) -> the diffusers key. ValueError naming missing keys, unexpected
    keys, or a shape mismatch (with both shapes); `what` names the module in the messages."""
    sd = dict(state_dict)
    flat, missing, used = [], [], set()
    for path, var in abstract_flat:
        key = key_of(path)
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        value = to_numpy(sd[key])
        raw_shape = value.shape
        value = torch_to_nhwc(value, path[-1] == "kernel", len(var.shape))
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"diffusers {key!r}: shape {raw_shape} converts to {value.shape}, but "
                             f"{what} needs {tuple(var.shape)} at {'/'.join(map(str, path))}")
        flat.append((path, var.replace(jnp.asarray(value))))
    if missing:
        raise ValueError(f"diffusers state_dict is missing keys needed by {what}: {listing(missing)}")
    unexpected = set(sd) - used
    if unexpected:
        raise ValueError(f"diffusers state_dict has keys {what} does not use: {listing(unexpected)}")
    return nnx.to_pure_dict(nnx.from_flat_state(flat))




def load_unet_cond(folder, **overrides) -> tuple[UNetCondConfig, dict]:
    """(config, params) of a diffusers UNet2DConditionModel saved in `folder` (config.json + weights), or in
    the `unet/` subfolder of a pipeline folder. `overrides` (e.g. dtype="bfloat16") go to the config."""
    config, state_dict = read_model_folder(folder, "unet", "UNet2DConditionModel")
    config = UNetCondConfig.from_diffusers(config, **overrides)
    return config, convert_unet_cond(state_dict, config)
