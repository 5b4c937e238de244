"""Blocks of the cross-attention U-Net (diffusers `UNet2DConditionModel`, Stable Diffusion 1.x), NHWC.

Every module mirrors the diffusers module of the same name, attribute for attribute, so that a
parameter path of `UNetCond` joined with "." is its diffusers state_dict key (up to `kernel`/`scale`/
`embedding` -> `weight` and the feed-forward's `ff.proj` / `ff.out` -> `ff.net.0.proj` / `ff.net.2`; see
`convert_unet_cond.diffusers_key`). The computations follow the installed diffusers sources:
  embeddings.py `TimestepEmbedding` (`get_timestep_embedding` is `layers.timestep_embedding`),
  resnet.py `ResnetBlock2D` (time_embedding_norm="default"), downsampling.py / upsampling.py
  `Downsample2D` / `Upsample2D`, transformers/transformer_2d.py `Transformer2DModel` (continuous input),
  attention.py `BasicTransformerBlock` (norm_type="layer_norm") and `FeedForward` with activations.py
  `GEGLU`, attention_processor.py `Attention` + `AttnProcessor2_0`.
Reference: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (the
  SpatialTransformer of latent diffusion that diffusers names Transformer2DModel).

Normalisations and attention logits run in float32 whatever the compute dtype (so diffusers'
`upcast_attention` is always on). Only `nnx.Param` state: dropout randomness comes from an explicit key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.conv import conv_general_dilated
from diffusion_jax.models.layers import (DEFAULT_INIT, ZERO_INIT, _mha, dropout, group_norm, guidance_embedding,
                                        guidance_projection)

TRANSFORMER_GROUPNORM_EPS = 1e-6  # Transformer2DModel's GroupNorm (fixed, not the config's norm_eps)
TRANSFORMER_LAYERNORM_EPS = 1e-5  # BasicTransformerBlock's LayerNorms (diffusers' default norm_eps)



def layer_norm(ch: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(ch, epsilon=TRANSFORMER_LAYERNORM_EPS, dtype=jnp.float32, use_fast_variance=False,
                         rngs=rngs)


def conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, dtype, *, stride: int = 1, padding=None,
         zero: bool = False) -> nnx.Conv:
    """k x k conv; `padding` defaults to (k - 1) // 2 on every side (torch's Conv2d(padding=(k-1)//2))."""
    p = (k - 1) // 2 if padding is None else padding
    pad = ((p, p), (p, p)) if isinstance(p, int) else p
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=pad, dtype=dtype,
                    kernel_init=ZERO_INIT if zero else DEFAULT_INIT, rngs=rngs,
                    conv_general_dilated=conv_general_dilated)


def linear(cin: int, cout: int, rngs: nnx.Rngs, dtype, *, bias: bool = True, zero: bool = False) -> nnx.Linear:
    return nnx.Linear(cin, cout, use_bias=bias, dtype=dtype, kernel_init=ZERO_INIT if zero else DEFAULT_INIT,
                      rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """h = conv1(silu(norm1(x))) + time_emb_proj(silu(emb));  h = conv2(dropout(silu(norm2(h))))
    out = (conv_shortcut(x) + h) / output_scale_factor, with a 1x1 conv_shortcut iff cin != cout.

    Shapes: x (B, H, W, cin), emb (B, temb) -> (B, H, W, cout).
    """

    def __init__(self, cin: int, cout: int, temb: int, *, groups: int, eps: float, dropout_rate: float,
                 output_scale_factor: float, dtype, rngs: nnx.Rngs):
        self.norm1 = group_norm(cin, groups, rngs, eps)
        self.conv1 = conv(cin, cout, 3, rngs, dtype)
        self.time_emb_proj = linear(temb, cout, rngs, dtype)
        self.norm2 = group_norm(cout, groups, rngs, eps)
        self.conv2 = conv(cout, cout, 3, rngs, dtype, zero=True)
        self.conv_shortcut = conv(cin, cout, 1, rngs, dtype) if cin != cout else None
        self.dropout_rate = dropout_rate
        self.output_scale_factor = output_scale_factor
        self.dtype = dtype

    def __call__(self, x: jax.Array, emb: jax.Array, key: jax.Array | None = None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)).astype(self.dtype))
        h = h + self.time_emb_proj(nnx.silu(emb))[:, None, None, :]
        h = dropout(nnx.silu(self.norm2(h)), self.dropout_rate, key).astype(self.dtype)
        h = self.conv2(h)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """3x3 conv with stride 2: padding p on every side, or, for p = 0, one zero row / column at the
    bottom / right only (diffusers `downsample_padding`; SD 1.x uses 1). (B, H, W, C) -> (B, H', W', C)."""

    def __init__(self, ch: int, *, padding: int, dtype, rngs: nnx.Rngs):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = conv(ch, ch, 3, rngs, dtype, stride=2, padding=pad)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `F.interpolate(mode="nearest", size=size)` in NHWC: src = min(floor(dst * in / out), in - 1)."""
    for axis, out in ((1, size[0]), (2, size[1])):
        n = x.shape[axis]
        if out == 2 * n:
            x = jnp.repeat(x, 2, axis=axis)
        elif out != n:
            src = np.minimum(np.floor(np.arange(out, dtype=np.float32) * np.float32(n / out)), n - 1)
            x = jnp.take(x, src.astype(np.int32), axis=axis)
    return x


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 (or to `size`, when a skip connection has an odd size), then a 3x3 conv."""

    def __init__(self, ch: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(ch, ch, 3, rngs, dtype)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else size
        return self.conv(nearest_resize(x, size))


class Attention(nnx.Module):
    """Multi-head attention (no q/k/v biases): to_out.0(MHA(to_q(h), to_k(c), to_v(c))), c = context or h.
    Scale 1 / sqrt(dim_head). h (B, N, dim), context (B, L, context_dim) -> (B, N, dim)."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, context_dim: int | None, dtype, rngs: nnx.Rngs):
        inner = heads * dim_head
        kv_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = linear(dim, inner, rngs, dtype, bias=False)
        self.to_k = linear(kv_dim, inner, rngs, dtype, bias=False)
        self.to_v = linear(kv_dim, inner, rngs, dtype, bias=False)
        self.to_out = nnx.List([linear(inner, dim, rngs, dtype)])

    def __call__(self, h: jax.Array, context: jax.Array | None = None) -> jax.Array:
        c = h if context is None else context
        return self.to_out[0](_mha(self.to_q(h), self.to_k(c), self.to_v(c), self.heads))


class FeedForward(nnx.Module):
    """GEGLU feed-forward: a, gate = split(proj(h)); out(a * gelu(gate)) (exact erf GELU), inner = 4 dim.
    `proj` / `out` are diffusers' `ff.net.0.proj` / `ff.net.2` (`ff.net.1` is a parameter-free dropout)."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs, mult: int = 4):
        inner = dim * mult
        self.proj = linear(dim, 2 * inner, rngs, dtype)
        self.out = linear(inner, dim, rngs, dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        a, gate = jnp.split(self.proj(h), 2, axis=-1)
        return self.out(a * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """h += attn1(norm1(h)) (self);  h += attn2(norm2(h), context) (cross);  h += ff(norm3(h)).
    h (B, N, dim), context (B, L, context_dim) -> (B, N, dim)."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, context_dim: int, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.norm1 = layer_norm(dim, rngs)
        self.attn1 = Attention(dim, heads, dim_head, context_dim=None, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, rngs)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, dtype=dtype, rngs=rngs)
        self.norm3 = layer_norm(dim, rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array, context: jax.Array) -> jax.Array:
        dt = self.dtype
        h = h + self.attn1(self.norm1(h).astype(dt))
        h = h + self.attn2(self.norm2(h).astype(dt), context)
        return h + self.ff(self.norm3(h).astype(dt))


class Transformer2DModel(nnx.Module):
    """Latent diffusion's spatial transformer on a feature map (continuous input):
    h = proj_in(norm(x)) as (B, H*W, inner), inner = heads * (ch // heads); `layers` BasicTransformerBlocks;
    out = proj_out(h) + x. proj_in / proj_out are 1x1 convs, or Linear layers if `use_linear_projection`
    (applied after / before the reshape, as diffusers does; the two are the same map).

    Shapes: x (B, H, W, ch), context (B, L, context_dim) -> (B, H, W, ch).
    """

    def __init__(self, ch: int, heads: int, *, layers: int, context_dim: int, groups: int,
                 use_linear_projection: bool, dtype, rngs: nnx.Rngs):
        dim_head = ch // heads
        inner = heads * dim_head
        self.dtype = dtype
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(ch, groups, rngs, TRANSFORMER_GROUPNORM_EPS)
        if use_linear_projection:
            self.proj_in = linear(ch, inner, rngs, dtype)
            self.proj_out = linear(inner, ch, rngs, dtype, zero=True)
        else:
            self.proj_in = conv(ch, inner, 1, rngs, dtype)
            self.proj_out = conv(inner, ch, 1, rngs, dtype, zero=True)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, context_dim=context_dim, dtype=dtype, rngs=rngs)
            for _ in range(layers)])

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hh, ww, ch = x.shape
        h = self.norm(x).astype(self.dtype)
        if self.use_linear_projection:
            h = self.proj_in(h.reshape(b, hh * ww, ch))
        else:
            h = self.proj_in(h)
            h = h.reshape(b, hh * ww, h.shape[-1])
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(b, hh, ww, ch)
        else:
            h = self.proj_out(h.reshape(b, hh, ww, h.shape[-1]))
        return h + x


class TimestepEmbedding(nnx.Module):
    """linear_2(silu(linear_1(features))), with features + cond_proj(guidance_embedding(w)) when cond_proj_dim is set
    (diffusers' time_cond_proj_dim: LCM's guidance-conditioned student; `layers.guidance_projection`)."""

    def __init__(self, cin: int, dim: int, *, cond_proj_dim: int | None = None, rngs: nnx.Rngs):
        self.linear_1 = linear(cin, dim, rngs, None)
        self.linear_2 = linear(dim, dim, rngs, None)
        self.cond_proj_dim = cond_proj_dim
        self.cond_proj = guidance_projection(cond_proj_dim, cin, rngs) if cond_proj_dim is not None else None

    def __call__(self, x: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
        if guidance is not None:
            x = x + self.cond_proj(guidance_embedding(guidance, self.cond_proj_dim))
        return self.linear_2(nnx.silu(self.linear_1(x)))


class Block(nnx.Module):
    """A down / mid / up block: `resnets`, `attentions` (one Transformer2DModel per ResBlock, or none)
    and at most one resampler (diffusers' `downsamplers.0` / `upsamplers.0`)."""

    def __init__(self, resnets, attentions, *, downsamplers=None, upsamplers=None):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions) if attentions else None
        self.downsamplers = nnx.List(downsamplers) if downsamplers else None
        self.upsamplers = nnx.List(upsamplers) if upsamplers else None
