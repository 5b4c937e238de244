"""Building blocks of the DDPM / ADM U-Net, NHWC throughout.

References:
  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM), Appendix B and the
    official TF code (`diffusion_tf/models/unet.py`): sinusoidal timestep embedding, pre-norm
    ResBlocks with an additive time-embedding projection, single-head self-attention blocks,
    stride-2 conv downsampling and nearest-neighbour + conv upsampling.
  Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (ADM): multi-head
    attention, class embeddings added to the time embedding.

Every module holds only `nnx.Param` state. Dropout randomness comes from an explicit `key`
argument, so a module split with `nnx.split(model, nnx.Param)` can be merged and applied inside
plain `jax.jit` without any RNG state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

GROUPNORM_EPS = 1e-6  # DDPM's TF group norm (and diffusers' google/ddpm-cifar10-32 norm_eps).
# DDPM's `default_init`: variance_scaling(1, fan_avg, uniform). The last layer of every residual
# branch (ResBlock conv2, attention output projections) and the output conv start at zero
# (DDPM `init_scale=0.`, ADM `zero_module`), so each block starts as the identity.
DEFAULT_INIT = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
ZERO_INIT = nnx.initializers.zeros_init()


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """DDPM sinusoidal embedding of (possibly fractional) timesteps.

    emb[:, i] = sin(t * w_i), emb[:, half + i] = cos(t * w_i), w_i = max_period**(-i / (half - 1)),
    i.e. sin first and a frequency shift of 1 (diffusers `flip_sin_to_cos=False, freq_shift=1`).

    Args:
      t: (B,) timesteps in DDPM units (0..T-1).
      dim: embedding width; odd widths are zero-padded.
    Returns:
      (B, dim) float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout driven by an explicit key; identity when `key is None` or `rate == 0`."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def group_norm(ch: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Normalisation always runs in float32 (also under bfloat16 compute).
    return nnx.GroupNorm(ch, num_groups=groups, epsilon=GROUPNORM_EPS, dtype=jnp.float32, rngs=rngs)


def conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, dtype, stride: int = 1, padding="SAME",
         zero: bool = False) -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, dtype=dtype,
                    kernel_init=ZERO_INIT if zero else DEFAULT_INIT, rngs=rngs)


def linear(cin: int, cout: int, rngs: nnx.Rngs, dtype=None, zero: bool = False) -> nnx.Linear:
    return nnx.Linear(cin, cout, dtype=dtype, kernel_init=ZERO_INIT if zero else DEFAULT_INIT, rngs=rngs)


class ResBlock(nnx.Module):
    """Pre-activation residual block (DDPM Appendix B; ADM without scale-shift norm).

    h = conv1(silu(norm1(x))) + time_proj(silu(emb))[:, None, None]
    h = conv2(dropout(silu(norm2(h))));  out = skip(x) + h, with a 1x1 `skip` conv when cin != cout.

    Shapes: x (B, H, W, cin), emb (B, emb_dim) -> (B, H, W, cout).
    """

    def __init__(self, cin: int, cout: int, emb_dim: int, *, groups: int, dropout_rate: float,
                 dtype, rngs: nnx.Rngs):
        self.norm1 = group_norm(cin, groups, rngs)
        self.conv1 = conv(cin, cout, 3, rngs, dtype)
        self.time_proj = linear(emb_dim, cout, rngs, dtype)
        self.norm2 = group_norm(cout, groups, rngs)
        self.conv2 = conv(cout, cout, 3, rngs, dtype, zero=True)
        self.skip = conv(cin, cout, 1, rngs, dtype) if cin != cout else None
        self.dropout_rate = dropout_rate

    def __call__(self, x: jax.Array, emb: jax.Array, key: jax.Array | None = None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.time_proj(nnx.silu(emb))[:, None, None, :]
        h = dropout(nnx.silu(self.norm2(h)), self.dropout_rate, key)
        h = self.conv2(h)
        skip = x if self.skip is None else self.skip(x)
        return skip + h


def _mha(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
    """Multi-head scaled dot-product attention; q (B, N, C), k/v (B, L, C) -> (B, N, C).

    Logits and softmax in float32 (diffusers' `upcast_softmax=True`)."""
    b, n, c = q.shape
    d = c // num_heads
    q, k, v = (a.reshape(a.shape[0], a.shape[1], num_heads, d) for a in (q, k, v))
    logits = jnp.einsum("bnhd,blhd->bhnl", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(d)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhnl,blhd->bnhd", w, v).reshape(b, n, c)


class AttentionBlock(nnx.Module):
    """Self-attention over the H*W positions (DDPM `attn_block`; ADM multi-head), optionally
    followed by cross-attention to a context sequence (as in latent diffusion, Rombach et al. 2022).

    h = x + proj_out(MHA(q(norm(x)), k(norm(x)), v(norm(x))))
    if context_dim: h = h + cross_out(MHA(cross_q(cross_norm(h)), cross_k(ctx), cross_v(ctx)))

    Shapes: x (B, H, W, C), context (B, L, context_dim) -> (B, H, W, C).
    """

    def __init__(self, ch: int, *, num_heads: int, groups: int, context_dim: int | None,
                 dtype, rngs: nnx.Rngs):
        lin = lambda i, o, zero=False: linear(i, o, rngs, dtype, zero)  # noqa: E731
        self.num_heads = num_heads
        self.norm = group_norm(ch, groups, rngs)
        self.q, self.k, self.v = lin(ch, ch), lin(ch, ch), lin(ch, ch)
        self.proj_out = lin(ch, ch, zero=True)
        if context_dim is not None:
            self.cross_norm = group_norm(ch, groups, rngs)
            self.cross_q, self.cross_out = lin(ch, ch), lin(ch, ch, zero=True)
            self.cross_k, self.cross_v = lin(context_dim, ch), lin(context_dim, ch)
        else:
            self.cross_norm = None

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, hh, ww, c = x.shape
        h = self.norm(x).reshape(b, hh * ww, c)
        a = _mha(self.q(h), self.k(h), self.v(h), self.num_heads)
        out = x.reshape(b, hh * ww, c) + self.proj_out(a)
        if self.cross_norm is not None:
            if context is None:
                raise ValueError("this attention block has cross-attention (model.context_dim is set) "
                                 "but no context was given")
            h = self.cross_norm(out.reshape(b, hh, ww, c)).reshape(b, hh * ww, c)
            a = _mha(self.cross_q(h), self.cross_k(context), self.cross_v(context), self.num_heads)
            out = out + self.cross_out(a)
        return out.reshape(b, hh, ww, c)


class Downsample(nnx.Module):
    """Stride-2 3x3 conv with DDPM's TF 'SAME' padding: zero-pad one row/column at the bottom/right
    only (diffusers `downsample_padding=0`). (B, H, W, C) -> (B, H/2, W/2, C)."""

    def __init__(self, ch: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(ch, ch, 3, rngs, dtype, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv. (B, H, W, C) -> (B, 2H, 2W, C)."""

    def __init__(self, ch: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(ch, ch, 3, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)
