"""A LoRA file (diffusers / peft layout, models/lora_io.py) merged into a trained run's U-Net for sampling.

    params = with_lora(exp, params, "exported/digits_lora", scale=0.5)     # `sample --lora ... --lora-scale 0.5`
"""
from __future__ import annotations

import jax

from diffusion_jax.models.lora import merge
from diffusion_jax.models.lora_io import load_lora


def with_lora(exp, params: dict, path: str, scale: float = 1.0) -> dict:
    """The run's params with the LoRA at `path` merged in: W + scale (alpha / r) A B. The run must be a `unet` /
    `unet_cond` run (a LoRA run's own adapters are already applied); ValueError naming the first key of a LoRA for
    another architecture."""
    if exp.model.name not in ("unet", "unet_cond"):
        raise ValueError(f"--lora merges into a 'unet' or 'unet_cond' run; this workdir is model.name="
                         f"{exp.model.name!r}")
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    adapters, paths, rank, alpha = load_lora(path, exp.model, shapes)
    return merge(params, adapters, paths, scale * alpha / rank)
