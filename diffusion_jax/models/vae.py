"""The KL autoencoder of latent diffusion (NHWC), in diffusers' `AutoencoderKL` layout.

References:
  Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (LDM), Sec. 3 and
    App. G: an encoder E maps x (H, W, 3) to a diagonal Gaussian q(z|x) over z (H/f, W/f, c), a decoder D
    maps z back; a tiny KL weight keeps the latent near N(0, I); the diffusion model sees z * s with
    s = 1 / std(z) (Sec. 4.3.2, D.1; `estimate_scaling_factor` in vae_loss.py).
  diffusers `AutoencoderKL` (models/autoencoders/autoencoder_kl.py, vae.py): the module and parameter
    layout mirrored here, so that `convert_vae.py` maps a state_dict name for name.

Layout (n = len(block_out_channels), C_i = block_out_channels[i], L = layers_per_block):
  Encoder: conv_in 3x3 -> down block i = 0..n-1: L x ResnetBlock(C_i), then (unless last) a stride-2
    3x3 conv after zero-padding one row / column at the bottom / right -> mid: ResnetBlock, single-head
    self-attention, ResnetBlock -> GroupNorm, SiLU, conv_out 3x3 to 2 * latent_channels (mean, logvar).
  quant_conv 1x1 (use_quant_conv) -> DiagonalGaussian (logvar clipped to [-30, 20]).
  post_quant_conv 1x1 (use_post_quant_conv) -> Decoder: conv_in 3x3 to C_{n-1} -> mid block -> up block
    i over reversed channels: (L + 1) x ResnetBlock, then (unless last) nearest x2 + conv 3x3 ->
    GroupNorm, SiLU, conv_out 3x3.
GroupNorm eps is 1e-6 everywhere, as in diffusers' VAE.

Used functionally (params = the pure dict of nnx.Param values, as everywhere in the library):
    params = init_vae(cfg, jax.random.key(0))            # or convert_vae.load_vae(folder)
    fns = make_vae_fns(cfg)                              # jitted
    post = fns.encode(params, x)                         # DiagonalGaussian(mean, logvar), (B, H/f, W/f, c)
    z = fns.encode_latents(params, x, key)               # posterior sample, scaled for diffusion
    x_hat = fns.decode_latents(params, z)                # unscaled, decoded: (B, H, W, out_channels)
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.functional import split_params
from diffusion_jax.models.layers import COMPUTE_DTYPES, AttentionBlock, Downsample, Upsample, conv, group_norm

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers / LDM DiagonalGaussianDistribution clamp

# diffusers AutoencoderKL config keys: ours (same name), and those whose only supported value is given.
_DIFFUSERS_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_DIFFUSERS_IGNORED = {"sample_size", "force_upcast"}  # tiling size; fp16 upcast policy of pipelines


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of `VAE`; the defaults are diffusers' `AutoencoderKL()` defaults. The `model` section
    of a run with model.name="vae" (`train.vae`); errors name keys as `model.<field>`. SD 1.x:
    block_out_channels=(128, 256, 512, 512), layers_per_block=2."""

    name: str = "vae"                       # backbone registry name (models/registry.py)
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215         # diffusion latents = (z - shift_factor) * scaling_factor
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"                  # compute dtype; params and GroupNorm stay float32

    def __post_init__(self):
        if isinstance(self.block_out_channels, list):
            object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}={value!r} must be a positive int")

        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            positive_int(name, getattr(self, name))
        if not isinstance(self.block_out_channels, tuple) or not self.block_out_channels:
            raise ValueError(f"model.block_out_channels={self.block_out_channels!r} must be a non-empty tuple")
        for i, ch in enumerate(self.block_out_channels):
            positive_int(f"block_out_channels[{i}]", ch)
            if ch % self.norm_num_groups:
                raise ValueError(f"model.block_out_channels[{i}]={ch} is not divisible by "
                                 f"model.norm_num_groups={self.norm_num_groups}")
        if not isinstance(self.scaling_factor, (int, float)) or not self.scaling_factor > 0:
            raise ValueError(f"model.scaling_factor={self.scaling_factor!r} must be a positive float")
        if self.shift_factor is not None and not isinstance(self.shift_factor, (int, float)):
            raise ValueError(f"model.shift_factor={self.shift_factor!r} must be a float or None")
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be a bool")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} must be one of {sorted(COMPUTE_DTYPES)}")

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any], **overrides) -> VAEConfig:
        """The config of a diffusers `AutoencoderKL` config.json dict; ValueError naming any key whose
        value this implementation does not support. Keys starting with "_" are metadata and ignored."""
        if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"diffusers config _class_name={cfg['_class_name']!r} is not AutoencoderKL")
        ours = {f.name for f in dataclasses.fields(cls)} - {"dtype", "name"}
        kwargs = {}
        for key, value in cfg.items():
            if key.startswith("_") or key in _DIFFUSERS_IGNORED or key in ("down_block_types", "up_block_types"):
                continue
            if key in _DIFFUSERS_FIXED:
                if value != _DIFFUSERS_FIXED[key]:
                    raise ValueError(f"diffusers config {key}={value!r} is not supported "
                                     f"(need {_DIFFUSERS_FIXED[key]!r})")
            elif key in ours:
                kwargs[key] = tuple(value) if key == "block_out_channels" else value
            else:
                raise ValueError(f"diffusers config key {key!r} is not supported by VAEConfig")
        n = len(kwargs.get("block_out_channels", cls.block_out_channels))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(cfg.get(key, (kind,)))
            if types != (kind,) * n:
                raise ValueError(f"diffusers config {key}={list(types)} is not supported (need {n} x {kind!r})")
        config = cls(**{**kwargs, **overrides})
        config.validate()
        return config


class DiagonalGaussian(NamedTuple):
    """q(z|x) = N(mean, exp(logvar)), per latent element; NHWC arrays (B, h, w, c). A pytree."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """(B, h, w, 2c) encoder output -> first c channels the mean, last c the log-variance (clipped)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) summed over each example's latent: (B,)."""
        return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=tuple(range(1, self.mean.ndim)))


class ResnetBlock(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))));
    shortcut is a 1x1 conv when cin != cout. (B, H, W, cin) -> (B, H, W, cout)."""

    def __init__(self, cin: int, cout: int, *, groups: int, dtype, rngs: nnx.Rngs):
        self.norm1 = group_norm(cin, groups, rngs)
        self.conv1 = conv(cin, cout, 3, rngs, dtype)
        self.norm2 = group_norm(cout, groups, rngs)
        self.conv2 = conv(cout, cout, 3, rngs, dtype, zero=True)
        self.conv_shortcut = conv(cin, cout, 1, rngs, dtype) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _Block(nnx.Module):
    """ResnetBlocks then an optional x2 resampler (Downsample / Upsample)."""

    def __init__(self, resnets: list, resample):
        self.resnets = nnx.List(resnets)
        self.resample = resample

    def __call__(self, x):
        for res in self.resnets:
            x = res(x)
        return x if self.resample is None else self.resample(x)


class MidBlock(nnx.Module):
    """ResnetBlock, single-head self-attention (optional), ResnetBlock (diffusers UNetMidBlock2D)."""

    def __init__(self, ch: int, *, add_attention: bool, groups: int, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(ch, ch, groups=groups, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attention = (AttentionBlock(ch, num_heads=1, groups=groups, context_dim=None, dtype=dtype, rngs=rngs)
                          if add_attention else None)

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    def __init__(self, c: VAEConfig, *, dtype, rngs: nnx.Rngs):
        boc, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = conv(c.in_channels, boc[0], 3, rngs, dtype)
        blocks, cin = [], boc[0]
        for i, ch in enumerate(boc):
            res = [ResnetBlock(cin if j == 0 else ch, ch, groups=g, dtype=dtype, rngs=rngs)
                   for j in range(c.layers_per_block)]
            down = Downsample(ch, dtype=dtype, rngs=rngs) if i < len(boc) - 1 else None
            blocks.append(_Block(res, down))
            cin = ch
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(boc[-1], add_attention=c.mid_block_add_attention, groups=g, dtype=dtype, rngs=rngs)
        self.conv_norm_out = group_norm(boc[-1], g, rngs)
        self.conv_out = conv(boc[-1], 2 * c.latent_channels, 3, rngs, dtype)

    def __call__(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, c: VAEConfig, *, dtype, rngs: nnx.Rngs):
        rev, g = c.block_out_channels[::-1], c.norm_num_groups
        self.conv_in = conv(c.latent_channels, rev[0], 3, rngs, dtype)
        self.mid_block = MidBlock(rev[0], add_attention=c.mid_block_add_attention, groups=g, dtype=dtype, rngs=rngs)
        blocks, cin = [], rev[0]
        for i, ch in enumerate(rev):
            res = [ResnetBlock(cin if j == 0 else ch, ch, groups=g, dtype=dtype, rngs=rngs)
                   for j in range(c.layers_per_block + 1)]
            up = Upsample(ch, dtype=dtype, rngs=rngs) if i < len(rev) - 1 else None
            blocks.append(_Block(res, up))
            cin = ch
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = group_norm(rev[-1], g, rngs)
        self.conv_out = conv(rev[-1], c.out_channels, 3, rngs, dtype)

    def __call__(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class VAE(nnx.Module):
    """KL autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`, x (B, H, W, C) in [-1, 1]."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        dt, lat = COMPUTE_DTYPES[config.dtype], config.latent_channels
        self.encoder = Encoder(config, dtype=dt, rngs=rngs)
        self.quant_conv = conv(2 * lat, 2 * lat, 1, rngs, dt) if config.use_quant_conv else None
        self.post_quant_conv = conv(lat, lat, 1, rngs, dt) if config.use_post_quant_conv else None
        self.decoder = Decoder(config, dtype=dt, rngs=rngs)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"VAE.encode wants (B, H, W, {self.config.in_channels}) images, got {x.shape}")
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"VAE.decode wants (B, h, w, {self.config.latent_channels}) latents, got {z.shape}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruction from a posterior sample (key given) or the posterior mean, and the posterior."""
        post = self.encode(x)
        return self.decode(post.mode() if key is None else post.sample(key)), post


# ---- pure functions --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def vae_graphdef(config: VAEConfig):
    """The (static) graphdef of `VAE(config)`, built without allocating parameters."""
    return nnx.split(nnx.eval_shape(lambda: VAE(config, rngs=nnx.Rngs(0))), nnx.Param)[0]


def init_vae(config: VAEConfig, key: jax.Array) -> dict:
    """Freshly initialised params (pure dict) of `VAE(config)`."""
    return split_params(VAE(config, rngs=nnx.Rngs(key)))[1]


def encode(params, x: jax.Array, config: VAEConfig) -> DiagonalGaussian:
    return nnx.merge(vae_graphdef(config), params).encode(x)


def decode(params, z: jax.Array, config: VAEConfig) -> jax.Array:
    return nnx.merge(vae_graphdef(config), params).decode(z)


def to_diffusion_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latent -> the diffusion model's space: (z - shift_factor) * scaling_factor."""
    shift = 0.0 if config.shift_factor is None else config.shift_factor
    return (z - shift) * config.scaling_factor


def from_diffusion_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """Inverse of `to_diffusion_latents`: z / scaling_factor + shift_factor."""
    shift = 0.0 if config.shift_factor is None else config.shift_factor
    return z / config.scaling_factor + shift


class VAEFns(NamedTuple):
    """Jitted pure functions of one VAEConfig (see `make_vae_fns`)."""

    encode: Callable          # (params, x) -> DiagonalGaussian
    decode: Callable          # (params, z) -> x
    encode_latents: Callable  # (params, x, key=None) -> diffusion latents (sample if key else mean)
    decode_latents: Callable  # (params, diffusion latents) -> x


def make_vae_fns(config: VAEConfig, compiler_options: dict | None = None) -> VAEFns:
    """Jitted encode / decode of `config`. compiler_options go to every `jax.jit` (e.g.
    {"xla_backend_optimization_level": 0} compiles a small model several times faster on CPU)."""
    config.validate()
    jit = functools.partial(jax.jit, compiler_options=compiler_options)

    def encode_latents(params, x, key=None):
        post = encode(params, x, config)
        return to_diffusion_latents(post.mode() if key is None else post.sample(key), config)

    return VAEFns(
        encode=jit(functools.partial(encode, config=config)),
        decode=jit(functools.partial(decode, config=config)),
        encode_latents=jit(encode_latents),
        decode_latents=jit(lambda params, z: decode(params, from_diffusion_latents(z, config), config)))
