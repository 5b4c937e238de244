"""DiT: the Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), NHWC.

    x (B, H, W, C) -> patchify: a p x p stride-p conv to D, + a 2-D sin-cos (MAE) or learned position embedding
      -> N blocks with adaLN-Zero conditioning on c = MLP(sinusoids(t)) + Embed(y):
           (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c))          (zero-initialised: identity)
           h = h + gate1 * Attention(LN(h) (1 + scale1) + shift1)
           h = h + gate2 * MLP(LN(h) (1 + scale2) + shift2)                          (GELU, tanh form; width 4D)
      -> final: LN(h) (1 + scale) + shift (adaLN), Linear to p * p * out_channels (zero-initialised) -> unpatchify.
LayerNorms have no affine parameters (eps 1e-6). Labels: num_classes + 1 embeddings, the last the null class of
classifier-free guidance (the objective drops labels to it, loss.cond_drop_prob; DiT's class_dropout_prob). Init as
DiT's: Xavier-uniform Linear / patch kernels, N(0, 0.02) label and timestep-MLP weights, zero biases and zero adaLN /
output layers. Sizes (Table 1): `DIT_SIZES` and `dit_config("DiT-XL/2", ...)`.

The timestep sinusoids are [cos, sin] of t 10000^(-i / (128 - freq_shift)) over 256 channels: DiT's own code has
freq_shift 0, diffusers' DiTTransformer2DModel 1 (its Timesteps(downscale_freq_shift=1)); `convert_dit` sets 1.

Used functionally, like `UNet`: net(x, t, y=None, context=None, *, train=False, dropout_key=None).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.layers import DEFAULT_INIT, ZERO_INIT, check_network_inputs, timestep_embedding
from diffusion_jax.models.patches import DTYPES, check_inputs, check_patch_config, labels_or_null, unpatchify
from diffusion_jax.models.unet_shape import output_channels

# Table 1 of the paper: hidden size D, depth N, heads
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
FREQ_DIM = 256                                    # width of the timestep sinusoids (DiT's frequency_embedding_size)
_NORMAL = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """`model` section of `model.name="dit"`; errors name keys as `model.<field>`."""

    name: str = "dit"
    image_size: int = 32            # pixels (or latent size); square
    in_channels: int = 4
    out_channels: int | None = None  # None -> in_channels, doubled when learn_sigma
    patch_size: int = 2
    hidden_size: int = 384           # D
    depth: int = 12                  # N
    num_heads: int = 6
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"        # "sincos": MAE's fixed 2-D embedding (DiT); "learned": a Param, N(0, 0.02)
    freq_shift: float = 0.0          # timestep sinusoids (module doc): 0 DiT, 1 diffusers
    mlp_norm_eps: float = 1e-6       # eps of the MLP branch's LayerNorm: 1e-6 DiT, diffusers' norm_eps (1e-5)
    num_classes: int | None = None   # class-conditional; label == num_classes is the null class
    context_dim: int | None = None   # cross-attention is not part of DiT: must be None
    learn_sigma: bool = False        # 2 x in_channels outputs (improved DDPM's variance; DiT's default)
    dtype: str = "float32"           # compute dtype; params float32

    @property
    def resolved_out_channels(self) -> int:
        return output_channels(self)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> None:
        check_patch_config(self, "dit", "DiT")
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"model.pos_embed={self.pos_embed!r} must be 'sincos' or 'learned'")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be a multiple of 4 for the 2-D sin-cos "
                             "position embedding")
        if not (isinstance(self.mlp_norm_eps, (int, float)) and 0 < self.mlp_norm_eps < 1):
            raise ValueError(f"model.mlp_norm_eps={self.mlp_norm_eps!r} must be a number in (0, 1)")


def dit_config(name: str = "DiT-S/2", **overrides) -> DiTConfig:
    """The DiTConfig of a paper model, "DiT-{S,B,L,XL}/{2,4,8}" (Table 1; its ImageNet setting: 32 x 32 x 4 latents,
    1000 classes, learned sigma), with `overrides` applied."""
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if size not in DIT_SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"DiT name {name!r} must be DiT-{{S,B,L,XL}}/{{2,4,8}}")
    hidden, depth, heads = DIT_SIZES[size]
    base = dict(image_size=32, in_channels=4, patch_size=int(patch), hidden_size=hidden, depth=depth, num_heads=heads,
                num_classes=1000, learn_sigma=True)
    return DiTConfig(**{**base, **overrides})


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE's fixed 2-D embedding (grid^2, dim), float32: [1-D(dim / 2) of the column, 1-D(dim / 2) of the row] per
    token (row-major), 1-D(d)(p) = [sin(p w), cos(p w)], w_i = 10000^(-i / (d / 2))."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1).astype(np.float32)


def _linear(cin, cout, rngs, dt, init=DEFAULT_INIT):
    return nnx.Linear(cin, cout, dtype=dt, kernel_init=init, bias_init=ZERO_INIT, rngs=rngs)


def _layer_norm(x, eps: float):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _modulate(x, shift, scale, eps: float = 1e-6):
    """LN(x) (1 + scale) + shift, LN without affine parameters, in float32. x (B, T, D); shift, scale (B, D)."""
    return _layer_norm(x, eps) * (1.0 + scale[:, None]) + shift[:, None]


class DiTBlock(nnx.Module):
    """adaLN-Zero transformer block (module doc). x (B, T, D), c (B, D) -> (B, T, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, *, mlp_norm_eps: float, dtype, rngs: nnx.Rngs):
        self.heads, self.mlp_norm_eps = heads, mlp_norm_eps
        self.qkv = _linear(dim, 3 * dim, rngs, dtype)
        self.proj = _linear(dim, dim, rngs, dtype)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.fc2 = _linear(dim, hidden, rngs, dtype), _linear(hidden, dim, rngs, dtype)
        self.ada = _linear(dim, 6 * dim, rngs, dtype, ZERO_INIT)

    def attention(self, x):
        b, n, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads), 3, axis=2)
        q, k, v = (a[:, :, 0] for a in (q, k, v))
        scale = 1.0 / math.sqrt(d // self.heads)
        logits = jnp.einsum("bnhd,bmhd->bhnm", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.proj(jnp.einsum("bhnm,bmhd->bnhd", w, v).reshape(b, n, d))

    def __call__(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(nnx.silu(c)), 6, axis=-1)
        dt = x.dtype
        x = x + gate1[:, None] * self.attention(_modulate(x, shift1, scale1).astype(dt))
        h = jax.nn.gelu(self.fc1(_modulate(x, shift2, scale2, self.mlp_norm_eps).astype(dt)), approximate=True)
        return x + gate2[:, None] * self.fc2(h)


class DiT(nnx.Module):
    """The Diffusion Transformer (module doc) of a `DiTConfig`."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = c = config
        dt = DTYPES[c.dtype]
        D, p = c.hidden_size, c.patch_size
        self.patch = nnx.Conv(c.in_channels, D, (p, p), strides=p, padding="VALID", dtype=dt, kernel_init=DEFAULT_INIT,
                              bias_init=ZERO_INIT, rngs=rngs)
        if c.pos_embed == "learned":
            self.pos = nnx.Param(_NORMAL(rngs.params(), (c.grid_size ** 2, D), jnp.float32))
        self.time_1, self.time_2 = _linear(FREQ_DIM, D, rngs, dt, _NORMAL), _linear(D, D, rngs, dt, _NORMAL)
        self.label = (nnx.Embed(c.num_classes + 1, D, embedding_init=_NORMAL, rngs=rngs)
                      if c.num_classes is not None else None)
        self.blocks = nnx.List([DiTBlock(D, c.num_heads, c.mlp_ratio, mlp_norm_eps=c.mlp_norm_eps, dtype=dt,
                                             rngs=rngs) for _ in range(c.depth)])
        self.final_ada = _linear(D, 2 * D, rngs, dt, ZERO_INIT)
        self.final = _linear(D, p * p * c.resolved_out_channels, rngs, dt, ZERO_INIT)

    def __call__(self, x, t, y=None, context=None, *, train: bool = False, dropout_key=None):
        """x (B, H, W, in_channels), t (B,) or scalar network time, y (B,) int labels in [0, num_classes] (None: the
        null class; must be None without num_classes) -> (B, H, W, resolved_out_channels) float32. DiT has no dropout:
        train and dropout_key change nothing."""
        c = self.config
        x, t, _ = check_network_inputs(x, t, c.in_channels, False, None)
        check_inputs(c, x, context)
        b, dt, p, g = x.shape[0], DTYPES[c.dtype], c.patch_size, c.grid_size
        h = self.patch(x.astype(dt)).reshape(b, g * g, c.hidden_size)
        pos = self.pos[...] if c.pos_embed == "learned" else sincos_pos_embed(c.hidden_size, g)
        h = h + jnp.asarray(pos, dt)
        emb = timestep_embedding(t, FREQ_DIM, flip_sin_to_cos=True, freq_shift=c.freq_shift)
        cond = self.time_2(nnx.silu(self.time_1(emb.astype(dt))))
        label = labels_or_null(self.label, c.num_classes, y, b)
        if label is not None:
            cond = cond + label.astype(cond.dtype)
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = jnp.split(self.final_ada(nnx.silu(cond)), 2, axis=-1)
        out = self.final(_modulate(h, shift, scale).astype(dt))            # (B, g^2, p p C)
        return unpatchify(out, g, p, c.resolved_out_channels).astype(jnp.float32)
