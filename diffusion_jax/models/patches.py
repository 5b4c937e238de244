"""What the transformer backbones (dit.py, uvit.py) share: their config checks, the patch tokens' layout and the
label embedding with its null class."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import COMPUTE_DTYPES

DTYPES = COMPUTE_DTYPES   # re-exported for dit.py / uvit.py


def check_patch_config(config, name: str, what: str) -> None:
    """ValueError naming `model.<key>` for the fields every patch transformer has (name, sizes, counts, patch and head
    divisibility, mlp_ratio, no cross-attention, dtype); `what` names the network in the messages."""
    if config.name != name:
        raise ValueError(f"model.name={config.name!r} does not name this config ({name})")
    for key in ("image_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
        v = getattr(config, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"model.{key}={v!r} must be a positive int")
    for key in ("out_channels", "num_classes"):
        v = getattr(config, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"model.{key}={v!r} must be None or a positive int")
    if config.image_size % config.patch_size:
        raise ValueError(f"model.patch_size={config.patch_size} does not divide model.image_size={config.image_size}")
    if config.hidden_size % config.num_heads:
        raise ValueError(f"model.num_heads={config.num_heads} does not divide model.hidden_size={config.hidden_size}")
    if not (isinstance(config.mlp_ratio, (int, float)) and config.mlp_ratio > 0):
        raise ValueError(f"model.mlp_ratio={config.mlp_ratio!r} must be a positive number")
    if config.context_dim is not None:
        raise ValueError(f"model.context_dim={config.context_dim}: {what} conditions on a class label and t only; "
                         "text conditioning needs model.name='unet_cond'")
    if config.dtype not in DTYPES:
        raise ValueError(f"model.dtype={config.dtype!r} must be one of {sorted(DTYPES)}")
    if config.learn_sigma and config.out_channels is not None and config.out_channels % 2:
        raise ValueError(f"model.out_channels={config.out_channels} must be even when model.learn_sigma=True")


def check_inputs(config, x, context) -> None:
    """ValueError unless x is (B, image_size, image_size, in_channels) and no context is given."""
    if context is not None:
        raise ValueError(f"context was given but model.name={config.name!r} has no cross-attention "
                         "(model.context_dim is None)")
    if x.shape[1:3] != (config.image_size, config.image_size):
        raise ValueError(f"x must be (B, {config.image_size}, {config.image_size}, {config.in_channels}), "
                         f"got {x.shape}")


def labels_or_null(label_embed, num_classes, y, b: int):
    """The label embeddings (B, D) of y (B,) ints in [0, num_classes] (None: the null class num_classes), or None for
    an unconditional network (label_embed None); ValueError for labels given to it or of the wrong shape."""
    if label_embed is None:
        if y is not None:
            raise ValueError("class labels y were given but the model is unconditional (model.num_classes is None)")
        return None
    y = jnp.full((b,), num_classes, jnp.int32) if y is None else jnp.asarray(y).astype(jnp.int32)
    if y.shape != (b,):
        raise ValueError(f"y must have shape ({b},), got {y.shape}")
    return label_embed(y)


def unpatchify(tokens: jax.Array, grid: int, patch: int, channels: int) -> jax.Array:
    """(B, grid^2, patch^2 channels) tokens (row-major patches, each (p1, p2, C)) -> (B, grid p, grid p, channels)."""
    b = tokens.shape[0]
    out = tokens.reshape(b, grid, grid, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, grid * patch, grid * patch, channels)
