"""U-ViT (Bao et al. 2023, "All are Worth Words: A ViT Backbone for Diffusion Models"), NHWC.

Everything is a token: the noise level, the class label and the patches go through one ViT with long skips.

    tokens = [Embed(y) (if class-conditional), sinusoids(t) (or an MLP of them), patch_i = a p x p stride-p conv of
              x] + a learned position embedding (one per token)
    in blocks (depth / 2):  h = Block(h), each output kept as a skip
    mid block:              h = Block(h)
    out blocks (depth / 2): h = Block(Linear([h, skip]))   (the long skips, last kept first used: a U-Net of tokens)
    Block(h) = h + Attention(LN(h)), then h + MLP(LN(h))   (pre-LN ViT block, GELU, width mlp_ratio D)
    out = conv3x3(unpatchify(Linear(LN(h))[patch tokens]))   (the conv smooths the patch borders; conv=False: none)

The paper's depth counts blocks (U-ViT-S: 13); `depth` here is the config's (the official code's), the in + out
blocks (12 for U-ViT-S), plus the mid block. Labels: num_classes + 1 embeddings, the last the null class of
classifier-free guidance. Init as the official code: Linear weights and the position embedding ~ N(0, 0.02)
(truncated at 2 std), zero biases, LayerNorm 1 / 0, label embeddings N(0, 1); convs Xavier-uniform. The timestep
sinusoids are [cos, sin] over D channels (freq shift 0), as its timestep_embedding.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.layers import DEFAULT_INIT, ZERO_INIT, check_network_inputs, timestep_embedding
from diffusion_jax.models.patches import DTYPES, check_inputs, check_patch_config, labels_or_null, unpatchify
from diffusion_jax.models.unet_shape import output_channels

_TRUNC = nnx.initializers.truncated_normal(0.02)
# the paper's Table 1 ("layers" = depth + 1 blocks): width, depth, heads
UVIT_SIZES = {"S": (512, 12, 8), "S-Deep": (512, 16, 8), "M": (768, 16, 12), "L": (1024, 20, 16), "H": (1152, 28, 16)}


@dataclasses.dataclass(frozen=True)
class UViTConfig:
    """`model` section of `model.name="uvit"`; errors name keys as `model.<field>`."""

    name: str = "uvit"
    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None   # None -> in_channels, doubled when learn_sigma
    patch_size: int = 2
    hidden_size: int = 512            # D
    depth: int = 12                   # in + out blocks (even); the mid block comes on top
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    mlp_time_embed: bool = False      # the time token through Linear(D, 4D), SiLU, Linear(4D, D) (ImageNet configs)
    conv: bool = True                 # a 3x3 conv on the unpatchified output
    skip: bool = True                 # the long skips (False: a plain ViT, the paper's ablation)
    num_classes: int | None = None    # class-conditional; label == num_classes is the null class
    context_dim: int | None = None    # text tokens are not implemented: must be None
    learn_sigma: bool = False
    dtype: str = "float32"

    @property
    def resolved_out_channels(self) -> int:
        return output_channels(self)

    @property
    def extras(self) -> int:
        """Tokens before the patches: the time token, and the label token when class-conditional."""
        return 1 + (self.num_classes is not None)

    def validate(self) -> None:
        check_patch_config(self, "uvit", "this U-ViT")
        if self.depth % 2:
            raise ValueError(f"model.depth={self.depth} must be even: depth / 2 in blocks, depth / 2 out blocks")
        for key in ("qkv_bias", "mlp_time_embed", "conv", "skip", "learn_sigma"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model.{key}={getattr(self, key)!r} must be a bool")


def _linear(cin, cout, rngs, dt, bias=True):
    return nnx.Linear(cin, cout, use_bias=bias, dtype=dt, kernel_init=_TRUNC, bias_init=ZERO_INIT, rngs=rngs)


def _layer_norm(dim: int, rngs) -> nnx.LayerNorm:
    """PyTorch's nn.LayerNorm(dim): eps 1e-5, two-pass variance, scale 1 / bias 0 (run in float32)."""
    return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


class UViTBlock(nnx.Module):
    """Pre-LN ViT block with an optional long-skip input (module doc). x (B, L, D) -> (B, L, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool, *, dtype, rngs):
        self.heads = heads
        self.norm1, self.norm2 = _layer_norm(dim, rngs), _layer_norm(dim, rngs)
        self.qkv = _linear(dim, 3 * dim, rngs, dtype, bias=qkv_bias)
        self.proj = _linear(dim, dim, rngs, dtype)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.fc2 = _linear(dim, hidden, rngs, dtype), _linear(hidden, dim, rngs, dtype)
        self.skip_linear = _linear(2 * dim, dim, rngs, dtype) if skip else None

    def __call__(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1))
        b, n, d = x.shape
        h = self.norm1(x.astype(jnp.float32)).astype(x.dtype)
        q, k, v = jnp.split(self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads), 3, axis=2)
        logits = jnp.einsum("bnhd,bmhd->bhnm", q[:, :, 0].astype(jnp.float32), k[:, :, 0].astype(jnp.float32))
        w = jax.nn.softmax(logits / math.sqrt(d // self.heads), axis=-1).astype(x.dtype)
        x = x + self.proj(jnp.einsum("bhnm,bmhd->bnhd", w, v[:, :, 0]).reshape(b, n, d))
        h = self.norm2(x.astype(jnp.float32)).astype(x.dtype)
        return x + self.fc2(jax.nn.gelu(self.fc1(h), approximate=False))


class UViT(nnx.Module):
    """U-ViT of a `UViTConfig` (module doc); net(x, t, y=None, context=None, *, train=False, dropout_key=None)."""

    def __init__(self, config: UViTConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = c = config
        dt = DTYPES[c.dtype]
        D, p, C = c.hidden_size, c.patch_size, c.resolved_out_channels
        self.patch = nnx.Conv(c.in_channels, D, (p, p), strides=p, padding="VALID", dtype=dt, kernel_init=DEFAULT_INIT,
                              rngs=rngs)
        self.time_mlp = nnx.List([_linear(D, 4 * D, rngs, dt), _linear(4 * D, D, rngs, dt)]) if c.mlp_time_embed \
            else None
        self.label = (nnx.Embed(c.num_classes + 1, D, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
                      if c.num_classes is not None else None)          # PyTorch's nn.Embedding: N(0, 1)
        self.pos = nnx.Param(_TRUNC(rngs.params(), (c.extras + (c.image_size // p) ** 2, D), jnp.float32))
        block = lambda skip: UViTBlock(D, c.num_heads, c.mlp_ratio, c.qkv_bias, skip, dtype=dt, rngs=rngs)  # noqa
        self.in_blocks = nnx.List([block(False) for _ in range(c.depth // 2)])
        self.mid_block = block(False)
        self.out_blocks = nnx.List([block(c.skip) for _ in range(c.depth // 2)])
        self.norm = _layer_norm(D, rngs)
        self.decoder = _linear(D, p * p * C, rngs, dt)
        self.final = nnx.Conv(C, C, (3, 3), padding="SAME", dtype=dt, kernel_init=DEFAULT_INIT, rngs=rngs) \
            if c.conv else None

    def __call__(self, x, t, y=None, context=None, *, train: bool = False, dropout_key=None):
        """x (B, H, W, in_channels), t (B,) or scalar network time, y (B,) int labels in [0, num_classes] (None: the
        null class) -> (B, H, W, resolved_out_channels) float32. No dropout: train and dropout_key change nothing."""
        c = self.config
        x, t, _ = check_network_inputs(x, t, c.in_channels, False, None)
        check_inputs(c, x, context)
        b, dt, p, g = x.shape[0], DTYPES[c.dtype], c.patch_size, c.image_size // c.patch_size
        tokens = [self.patch(x.astype(dt)).reshape(b, g * g, c.hidden_size)]
        time = timestep_embedding(t, c.hidden_size, flip_sin_to_cos=True, freq_shift=0.0).astype(dt)
        if self.time_mlp is not None:
            time = self.time_mlp[1](nnx.silu(self.time_mlp[0](time)))
        tokens.insert(0, time[:, None])
        label = labels_or_null(self.label, c.num_classes, y, b)
        if label is not None:
            tokens.insert(0, label.astype(dt)[:, None])
        h = jnp.concatenate(tokens, axis=1) + self.pos[...].astype(dt)
        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        for blk in self.out_blocks:
            h = blk(h, skips.pop())
        out = self.decoder(self.norm(h.astype(jnp.float32)).astype(dt))[:, c.extras:]
        out = unpatchify(out, g, p, c.resolved_out_channels)
        if self.final is not None:
            out = self.final(out)
        return out.astype(jnp.float32)
