"""LoRA adapters (models/lora.py) as the safetensors file that diffusers' `load_lora_weights` / `load_lora_adapter`
and peft read (`pytorch_lora_weights.safetensors`):

    {prefix}.{module}.lora_A.weight    (r, I)   a conv: (r, I, kh, kw)
    {prefix}.{module}.lora_B.weight    (O, r)   a conv: (O, r, 1, 1)

`module` is the diffusers name of the adapted layer (UNet2DConditionModel's for a `unet_cond` base, UNet2DModel's
for `unet`), prefix "unet"; the file's metadata "lora_adapter_metadata" holds peft's LoraConfig ({prefix}.r,
{prefix}.lora_alpha, {prefix}.target_modules), so the scale alpha / r travels with it.

    save_lora("out/", config, adapters, paths)               # -> out/pytorch_lora_weights.safetensors
    adapters, rank, alpha = load_lora("out/", base_config)   # refuses a LoRA of another architecture by key / shape
"""
from __future__ import annotations

import json
import os

import numpy as np
from flax import traverse_util

from diffusion_jax.models.convert_diffusers import _diffusers_key as unet2d_key
from diffusion_jax.models.convert_unet_cond import diffusers_key as unet_cond_key
from diffusion_jax.models.export_diffusers import torch_layout
from diffusion_jax.models.lora import module_name, target_paths

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


def module_key(base_name: str, path: tuple) -> str:
    """The diffusers module name of the base kernel at `path`: ('net', 'down_blocks', 0, ..., 'to_q', 'kernel') ->
    'down_blocks.0....to_q' (unet_cond); ('mid_attn', 'q', 'kernel') -> 'mid_block.attentions.0.to_q' (unet)."""
    key = unet_cond_key(path[1:]) if base_name == "unet_cond" else unet2d_key(path)
    return key[: -len(".weight")]


def lora_state_dict(base_name: str, adapters: dict, paths, prefix: str = "unet") -> dict[str, np.ndarray]:
    """{key: float32 array in PyTorch's layout} of the adapters {i: {"lora_A", "lora_B"}} of paths[i]."""
    out = {}
    for i, path in enumerate(paths):
        a, b = np.asarray(adapters[i]["lora_A"], np.float32), np.asarray(adapters[i]["lora_B"], np.float32)
        key = f"{prefix}.{module_key(base_name, path)}"
        out[f"{key}.lora_A.weight"] = torch_layout(a, True)           # (I, r) -> (r, I); conv -> (r, I, kh, kw)
        b = torch_layout(b, True)                                      # (r, O) -> (O, r)
        out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[:, :, None, None]) if a.ndim == 4 else b
    return out


def save_lora(folder: str, config, adapters: dict, paths, prefix: str = "unet") -> str:
    """Write folder/pytorch_lora_weights.safetensors (config: the LoRAConfig); returns the file's path."""
    from safetensors.numpy import save_file

    modules = [module_key(config.base.name, p) for p in paths]
    meta = {f"{prefix}.r": config.rank, f"{prefix}.lora_alpha": float(config.alpha),
            f"{prefix}.target_modules": modules, f"{prefix}.init_lora_weights": True}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WEIGHT_NAME)
    save_file(lora_state_dict(config.base.name, adapters, paths, prefix), path,
              metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def load_lora(path: str, base, base_params_shapes: dict, prefix: str = "unet"):
    """(adapters {i: {"lora_A", "lora_B"}}, paths, rank, alpha) of a LoRA file (or a folder holding
    pytorch_lora_weights.safetensors) for the base `base` (a unet / unet_cond config) whose params have the
    shapes `base_params_shapes`. Rank and alpha come from the metadata (peft's default alpha = r without it).
    ValueError naming the first key that does not fit this base (a LoRA of another architecture)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path!r} does not exist")
    with safe_open(path, framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get(METADATA_KEY) or "{}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kernels = target_paths(base_params_shapes, _all_names(base_params_shapes), base.name)
    by_key = {f"{prefix}.{module_key(base.name, p)}": p for p in kernels}
    flat = traverse_util.flatten_dict(base_params_shapes)
    paths, adapters, rank = [], {}, None
    for key in sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")):
        if key not in by_key:
            raise ValueError(f"LoRA file {path!r}: {key!r} is not a Linear or conv layer of this {base.name!r} base "
                             "(a LoRA of another architecture?)")
        p = by_key[key]
        a, b = tensors[f"{key}.lora_A.weight"], tensors.get(f"{key}.lora_B.weight")
        if b is None:
            raise ValueError(f"LoRA file {path!r} has {key}.lora_A.weight but no {key}.lora_B.weight")
        w = flat[p].shape
        a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T          # -> (..., I, r)
        b = (b[:, :, 0, 0] if b.ndim == 4 else b).T                   # -> (r, O)
        if a.shape[:-1] != tuple(w[:-1]) or b.shape[1] != w[-1] or a.shape[-1] != b.shape[0]:
            raise ValueError(f"LoRA file {path!r}: {key} has A {a.shape[::-1]} and B {b.shape[::-1]} (PyTorch layout) "
                             f"but the layer's kernel here is {tuple(w)} (a LoRA of another architecture?)")
        rank = a.shape[-1] if rank is None else rank
        if a.shape[-1] != rank:
            raise ValueError(f"LoRA file {path!r}: ranks differ between layers ({rank} and {a.shape[-1]} at {key})")
        adapters[len(paths)] = {"lora_A": a.astype(np.float32), "lora_B": b.astype(np.float32)}
        paths.append(p)
    if not paths:
        raise ValueError(f"LoRA file {path!r} has no '{prefix}.*.lora_A.weight' keys (is it a {prefix} LoRA?)")
    alpha = float(meta.get(f"{prefix}.lora_alpha", rank))
    if int(meta.get(f"{prefix}.r", rank)) != rank:
        raise ValueError(f"LoRA file {path!r}: metadata r={meta[f'{prefix}.r']} but the weights have rank {rank}")
    order = sorted(range(len(paths)), key=lambda i: kernels.index(paths[i]))   # the base's flattening order
    return ({j: adapters[i] for j, i in enumerate(order)}, tuple(paths[i] for i in order), rank, alpha)


def _all_names(params) -> tuple[str, ...]:
    return tuple({module_name(p) for p in traverse_util.flatten_dict(params) if p[-1] == "kernel"})
