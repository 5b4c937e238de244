"""Convert a diffusers `AutoencoderKL` (state_dict + config.json) into `VAE` params.

A diffusers state_dict (torch tensors or numpy arrays; conv kernels (O, I, kh, kw), Linear weights
(O, I)) maps name for name onto the NHWC params of `VAE` (conv kernels (kh, kw, I, O), Linear kernels
(I, O)). Mid-block attention weights may use the current names (to_q / to_k / to_v / to_out.0) or the
legacy ones of older checkpoints (query / key / value / proj_attn), as diffusers itself accepts; 1x1-conv
shaped (O, I, 1, 1) attention projections are squeezed. Nothing here imports torch, except `load_vae`
for a `.bin` file (and only when no safetensors file is there).

    config, params = load_vae("stable-diffusion-v1-5/vae")   # config.json + diffusion_pytorch_model.*
    fns = make_vae_fns(config)
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.vae import VAE, VAEConfig
from diffusion_jax.models.weights_io import listing, read_model_folder, to_numpy, torch_to_nhwc

_MODULES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
            "attention": "attentions.0"}
_PARAMS = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_key(path: tuple) -> str:
    """('encoder', 'down_blocks', 0, 'resample', 'conv', 'kernel') -> 'encoder.down_blocks.0.downsamplers.0.conv.weight'."""
    *mods, param = path
    out = []
    for m in mods:
        if m == "resample":
            out.append("downsamplers.0" if "down_blocks" in mods else "upsamplers.0")
        else:
            out.append(str(m) if isinstance(m, int) else _MODULES.get(m, m))
    return ".".join(out + [_PARAMS[param]])


def _canonical(key: str) -> str:
    """Legacy attention names -> current ones ('encoder.mid_block.attentions.0.query.weight' -> '...to_q.weight')."""
    parts = key.split(".")
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in _LEGACY:
        parts[-2] = _LEGACY[parts[-2]]
    return ".".join(parts)




@functools.lru_cache(maxsize=8)
def _abstract_flat(config: VAEConfig) -> tuple:
    """((path, abstract nnx.Param), ...) of `VAE(config)`, without allocating."""
    _, abstract = nnx.split(nnx.eval_shape(lambda: VAE(config, rngs=nnx.Rngs(0))), nnx.Param)
    return tuple(nnx.to_flat_state(abstract))


def convert_vae(state_dict: Mapping[str, Any], config: VAEConfig) -> dict:
    """Map a diffusers `AutoencoderKL` state_dict onto the params (pure dict) of `VAE(config)`.

    Raises ValueError naming missing keys, unexpected keys, a legacy / current name given twice, or a
    shape mismatch (with both shapes).
    """
    sd = {}
    for key, value in state_dict.items():
        name = _canonical(key)
        if name in sd:
            raise ValueError(f"diffusers state_dict has both {key!r} and its other name {name!r}")
        sd[name] = (key, value)
    flat, missing, used = [], [], set()
    for path, var in _abstract_flat(config):
        name = diffusers_key(path)
        if name not in sd:
            missing.append(name)
            continue
        used.add(name)
        value = to_numpy(sd[name][1])
        raw_shape = value.shape
        value = torch_to_nhwc(value, path[-1] == "kernel", len(var.shape))
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"diffusers {sd[name][0]!r}: shape {raw_shape} converts to "
                             f"{value.shape}, but VAE({config}) needs {tuple(var.shape)} at {'/'.join(map(str, path))}")
        flat.append((path, var.replace(jnp.asarray(value))))
    if missing:
        raise ValueError(f"diffusers state_dict is missing keys needed by VAE({config}): {listing(missing)}")
    unexpected = [sd[name][0] for name in set(sd) - used]
    if unexpected:
        raise ValueError(f"diffusers state_dict has keys VAE({config}) does not use: {listing(unexpected)}")
    return nnx.to_pure_dict(nnx.from_flat_state(flat))




def load_vae(folder: str, **overrides) -> tuple[VAEConfig, dict]:
    """(config, params) of a diffusers AutoencoderKL saved in `folder` (config.json + weights), or in the
    `vae/` subfolder of a pipeline folder. `overrides` (e.g. dtype="bfloat16") go to the VAEConfig."""
    config, state_dict = read_model_folder(folder, "vae", "VAE")
    config = VAEConfig.from_diffusers(config, **overrides)
    return config, convert_vae(state_dict, config)
