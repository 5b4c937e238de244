"""The DDPM / ADM U-Net (NHWC) and its typed configuration.

References:
  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): the defaults of
    `UNetConfig` are the DDPM CIFAR-10 model (35,746,307 parameters, the same as diffusers'
    `UNet2DModel` for google/ddpm-cifar10-32).
  Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (ADM): multi-head
    attention, class-conditional embeddings.
  Nichol & Dhariwal 2021, "Improved DDPM": `learn_sigma` doubles the output channels.
  Ho & Salimans 2022, classifier-free guidance: label `num_classes` is the null class.
  Song et al. 2021, "Score-Based Generative Modeling through SDEs" (score_sde `models/ncsnpp.py`):
    the DDPM++ / NCSN++ options `time_embedding="fourier"`, `resblock="biggan"`,
    `resample_filter="fir"`, `skip_rescale`. The defaults keep the DDPM model unchanged. E.g.
      DDPM++ (VP):  UNetConfig(resblock="biggan", skip_rescale=True)
      NCSN++ (VE):  UNetConfig(time_embedding="fourier", resblock="biggan", resample_filter="fir",
                               skip_rescale=True)
    score_sde's `init_scale=0.` (last conv of every residual branch and the output conv start at
    zero) is what this U-Net always does. NCSN++'s progressive input / output image pyramids and its
    single attention per decoder level are `skip_pyramid` and `up_attention="last"`, as diffusers'
    Skip*Block2D build them (google/ncsnpp-*; `convert_diffusers` maps those checkpoints).

Used functionally:
    model = UNet(UNetConfig(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)   # params is the only state
    out = jax.jit(lambda p, x, t: nnx.merge(graphdef, p)(x, t))(params, x, t)
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.layers import (
    COMPUTE_DTYPES,
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    add_residuals,
    check_guidance,
    check_network_inputs,
    conv,
    fourier_embedding,
    fourier_frequencies,
    group_norm,
    guidance_embedding,
    guidance_projection,
    linear,
    timestep_embedding,
)
from diffusion_jax.models.resample import downsample_2d, upsample_2d
from diffusion_jax.models.unet_config import UNetConfig

__all__ = ["UNet", "UNetConfig"]


class _Level(nnx.Module):
    """One resolution level: ResBlocks, attention after each (or after the last), optional resampling, and with
    `skip_pyramid` the pyramid's convs (down: skip_conv 1x1 from the image; up: skip_norm, skip_conv 3x3 to it)."""

    def __init__(self, res: list, attn: list, resample, skip_conv=None, skip_norm=None):
        self.res = nnx.List(res)
        self.attn = nnx.List(attn)  # empty, one AttentionBlock per ResBlock, or one after the last
        self.resample = resample    # Downsample / Upsample / a resampling ResBlock (biggan) / None
        self.skip_conv, self.skip_norm = skip_conv, skip_norm

    def attention_after(self, j: int):
        """The AttentionBlock that follows ResBlock j, or None."""
        if len(self.attn) == len(self.res):
            return self.attn[j]
        return self.attn[0] if len(self.attn) and j == len(self.res) - 1 else None

    def apply_resample(self, h, emb, key):
        if isinstance(self.resample, ResBlock):
            return self.resample(h, emb, key())
        return self.resample(h)


class UNet(nnx.Module):
    """DDPM / ADM U-Net epsilon (or x0 / v) predictor.

    Layout (L = len(channel_mult), C_i = channels * channel_mult[i]):
      t -> time_features (sinusoidal(channels) | Fourier(2 channels)) -> Linear(4C) -> SiLU
        -> Linear(4C) = emb  (+ class embedding)
      conv_in 3x3 -> down levels i = 0..L-1: num_res_blocks x [ResBlock(C_i) (+ Attention)],
        unless last: Downsample (resblock="ddpm") or ResBlock(down) (resblock="biggan")
        -> middle: ResBlock, Attention, ResBlock ->
      up levels i = L-1..0: (num_res_blocks + 1) x [concat skip, ResBlock(C_i) (+ Attention)],
        unless i == 0: Upsample or ResBlock(up) -> GroupNorm, SiLU, conv_out 3x3.
    Every resampling follows `resample_filter`; every residual sum is scaled by 1/sqrt(2) when
    `skip_rescale` (the U-Net's concatenated skips are not). `skip_pyramid` (NCSN++): the input image,
    resampled, enters each downsampled level through a 1x1 conv; every up level but the last adds
    conv3x3(SiLU(GroupNorm(h))) to the output pyramid (upsampled level by level), which is added to the
    output. `scale_by_sigma`: the output is divided by t.
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, encoder_only: bool = False):
        config.validate()
        self.config = config
        c = config
        dt = COMPUTE_DTYPES[c.dtype]
        emb_dim = 4 * c.channels
        kw = dict(groups=c.num_groups, dropout_rate=float(c.dropout), dtype=dt, rngs=rngs,
                  resample_filter=c.resample_filter, skip_rescale=c.skip_rescale, norm_eps=c.norm_eps,
                  act=c.act_fn, scale_shift=c.resnet_time_scale_shift == "scale_shift")
        attn = lambda ch, scale=1.0, groups=c.num_groups: AttentionBlock(  # noqa: E731
            ch, num_heads=c.num_heads if c.head_dim is None else ch // c.head_dim, groups=groups,
            context_dim=c.context_dim, dtype=dt, rngs=rngs, skip_rescale=c.skip_rescale, norm_eps=c.norm_eps,
            output_scale=scale)

        def resampler(ch, direction):
            if c.resblock == "biggan":
                return ResBlock(ch, ch, emb_dim, resample=direction, resample_shortcut=c.resample_shortcut, **kw)
            layer = Downsample if direction == "down" else Upsample
            extra = {"padding": c.downsample_padding} if direction == "down" else {}
            return layer(ch, dtype=dt, rngs=rngs, resample_filter=c.resample_filter, **extra)

        time_dim = 2 * c.channels if c.time_embedding == "fourier" else c.channels
        self.time_embed_1 = linear(time_dim, emb_dim, rngs)
        self.time_embed_2 = linear(emb_dim, emb_dim, rngs)
        self.cond_proj = (guidance_projection(c.guidance_embed_dim, time_dim, rngs)
                          if c.guidance_embed_dim is not None else None)
        self.class_embed = (nnx.Embed(c.num_classes + 1, emb_dim, rngs=rngs)
                            if c.num_classes is not None else None)
        if c.class_embed_type == "timestep":   # y through the time features and an MLP of its own (diffusers)
            self.class_embed_1, self.class_embed_2 = linear(time_dim, emb_dim, rngs), linear(emb_dim, emb_dim, rngs)
        self.conv_in = conv(c.in_channels, c.channels, 3, rngs, dt)

        n_levels = len(c.channel_mult)
        skip_chs = [c.channels]
        ch = c.channels
        down = []
        for i, mult in enumerate(c.channel_mult):
            use_attn = c.resolutions[i] in c.attention_resolutions
            res, attns = [], []
            for _ in range(c.num_res_blocks):
                res.append(ResBlock(ch, c.channels * mult, emb_dim, **kw))
                ch = c.channels * mult
                if use_attn:
                    attns.append(attn(ch))
                skip_chs.append(ch)
            last = i == n_levels - 1
            pyramid = c.skip_pyramid and not last    # the image, resampled to this level's output, joins it
            down.append(_Level(res, attns, None if last else resampler(ch, "down"),
                               conv(c.in_channels, ch, 1, rngs, dt) if pyramid else None))
            if not last:
                skip_chs.append(ch)
        self.down = nnx.List(down)

        mid = float(c.mid_block_scale_factor)
        self.mid_res1 = ResBlock(ch, ch, emb_dim, output_scale=mid, **kw)
        self.mid_attn = attn(ch, mid, c.attn_norm_num_groups or c.num_groups) if c.add_attention else None
        self.mid_res2 = ResBlock(ch, ch, emb_dim, output_scale=mid, **kw)
        self.skip_channels = tuple(skip_chs)   # width of each skip, in the order `encode` returns them
        if encoder_only:                       # a ControlNet's trainable copy (models/controlnet.py)
            return

        up = []  # in order of application: lowest resolution first
        for i in reversed(range(n_levels)):
            use_attn = c.resolutions[i] in c.attention_resolutions
            res, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                res.append(ResBlock(ch + skip_chs.pop(), c.channels * c.channel_mult[i], emb_dim, **kw))
                ch = c.channels * c.channel_mult[i]
                if use_attn and (c.up_attention == "each" or len(res) == c.num_res_blocks + 1):
                    attns.append(attn(ch))
            pyramid = c.skip_pyramid and i > 0       # this level's image, added to the output pyramid
            up.append(_Level(res, attns, resampler(ch, "up") if i > 0 else None,
                             conv(ch, c.resolved_out_channels, 3, rngs, dt) if pyramid else None,
                             group_norm(ch, c.num_groups, rngs, c.norm_eps) if pyramid else None))
        self.up = nnx.List(up)

        self.norm_out = group_norm(ch, c.num_groups, rngs, c.norm_eps)
        self.conv_out = conv(ch, c.resolved_out_channels, 3, rngs, dt, zero=True)

    def time_features(self, t) -> jax.Array:
        """The parameter-free time embedding fed to `time_embed_1`.

        "positional": DDPM sinusoids of t, (B, channels). "fourier": [sin(2 pi W s), cos(2 pi W s)]
        with s = log(t) if `fourier_log_input` else t and W = `fourier_weights` or fourier_frequencies(channels,
        fourier_scale), (B, 2 channels). t: (B,) float.
        """
        c = self.config
        t = jnp.asarray(t, jnp.float32)
        if c.time_embedding == "fourier":
            s = jnp.log(t) if c.fourier_log_input else t
            w = fourier_frequencies(c.channels, c.fourier_scale) if c.fourier_weights is None else c.fourier_weights
            return fourier_embedding(s, np.asarray(w, np.float32))
        return timestep_embedding(t, c.channels, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)

    def __call__(self, x, t, y=None, context=None, *, residuals=None, train: bool = False, dropout_key=None,
                 guidance=None):
        """Predict from a noisy batch.

        Args:
          x: (B, H, W, in_channels) float.
          t: (B,) (or scalar) float or int network time: timesteps in DDPM units (0..T-1, may be
            fractional) for "positional"; for "fourier" the noise level sigma > 0 (its log is
            embedded, score_sde NCSN++) or, with fourier_log_input=False, the value to embed.
          y: (B,) int labels in [0, num_classes] (num_classes = null class), or None (-> null class);
            must be None for an unconditional model. class_embed_type "timestep": (B,) float, embedded as t is;
            "identity": (B, 4 channels) float, added to the time embedding; both required.
          context: (B, L, context_dim), required iff `context_dim` is set.
          residuals: ControlNet residuals (down, mid) added to the skips and the middle block's output
            (`layers.add_residuals`), or None.
          train: apply dropout, with randomness from `dropout_key` (one fold per ResBlock).
          guidance: (B,) classifier-free guidance weights w (1 = none), required iff `guidance_embed_dim` is set
            (a guidance-distilled student); their embedding is added to the time features.
        Returns:
          (B, H, W, resolved_out_channels) float32, divided by t when `scale_by_sigma`.
        """
        x, emb, context, key = self.prepare(x, t, y, context, train=train, dropout_key=dropout_key, guidance=guidance)
        skips, h = self.encode(x, emb, context, key)
        skips, h = add_residuals(skips, h, residuals)
        out = self.decode(h, skips, emb, context, key)
        if self.config.scale_by_sigma:
            out = out / jnp.broadcast_to(jnp.asarray(t, jnp.float32), out.shape[:1])[:, None, None, None]
        return out

    def prepare(self, x, t, y=None, context=None, *, train: bool = False, dropout_key=None, guidance=None):
        """Checked inputs -> (x in the compute dtype, emb (B, 4 channels), context, key) with key() the next
        dropout key (None without dropout); the arguments are those of `__call__`."""
        c = self.config
        dt = COMPUTE_DTYPES[c.dtype]
        x, t, use_dropout = check_network_inputs(x, t, c.in_channels, train and c.dropout > 0, dropout_key)
        x = 2 * x - 1 if c.center_input_sample else x
        b = x.shape[0]

        if self.class_embed is None and y is not None and c.class_embed_type is None:
            raise ValueError("class labels y were given but the model is unconditional "
                             "(model.num_classes is None)")
        if self.class_embed is not None:
            y = jnp.full((b,), c.num_classes, jnp.int32) if y is None else jnp.asarray(y).astype(jnp.int32)
            if y.shape != (b,):
                raise ValueError(f"y must have shape ({b},), got {y.shape}")
        if c.context_dim is None and context is not None:
            raise ValueError("context was given but the model has no cross-attention (model.context_dim is None)")
        if c.context_dim is not None:
            if context is None:
                raise ValueError(f"the model has cross-attention (model.context_dim={c.context_dim}); "
                                 "pass context of shape (B, L, context_dim)")
            context = jnp.asarray(context)
            if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != c.context_dim:
                raise ValueError(f"context must be ({b}, L, {c.context_dim}), got {context.shape}")
            context = context.astype(dt)

        features = self.time_features(t)
        guidance = check_guidance(guidance, c.guidance_embed_dim, b)
        if guidance is not None:
            features = features + self.cond_proj(guidance_embedding(guidance, c.guidance_embed_dim))
        emb = self.time_embed_2(nnx.silu(self.time_embed_1(features)))
        if self.class_embed is not None:
            emb = emb + self.class_embed(y)
        elif c.class_embed_type is not None:
            emb = emb + self.embed_class(y, b)
        counter = itertools.count()
        key = lambda: jax.random.fold_in(dropout_key, next(counter)) if use_dropout else None  # noqa: E731
        return x.astype(dt), emb.astype(dt), context, key

    def embed_class(self, y, b: int) -> jax.Array:
        """The class embedding of `class_embed_type` "timestep" (y (B,) -> MLP(time_features(y))) or "identity"
        (y (B, 4 channels) as given), (B, 4 channels) float32; ValueError naming y's expected shape."""
        c = self.config
        shape = (b,) if c.class_embed_type == "timestep" else (b, 4 * c.channels)
        y = None if y is None else jnp.asarray(y, jnp.float32)
        if y is None or y.shape != shape:
            raise ValueError(f"model.class_embed_type={c.class_embed_type!r} needs y of shape {shape}, got "
                             f"{None if y is None else y.shape}")
        if c.class_embed_type == "identity":
            return y
        return self.class_embed_2(nnx.silu(self.class_embed_1(self.time_features(y))))

    def encode(self, x, emb, context, key, hint=None):
        """conv_in (+ hint, a ControlNet's conditioning features), down levels, middle block ->
        (skips: one (B, h, w, skip_channels[i]) per skip, h: the middle block's output)."""
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint.astype(h.dtype)
        skips, image = [h], x
        for level in self.down:
            for j, res in enumerate(level.res):
                h = res(h, emb, key())
                attn = level.attention_after(j)
                h = h if attn is None else attn(h, context)
                skips.append(h)
            if level.resample is not None:
                h = level.apply_resample(h, emb, key)
                if level.skip_conv is not None:     # the input pyramid
                    image = downsample_2d(image, self.config.resample_filter)
                    h = h + level.skip_conv(image)
                skips.append(h)

        h = self.mid_res1(h, emb, key())
        h = h if self.mid_attn is None else self.mid_attn(h, context)
        return skips, self.mid_res2(h, emb, key())

    def decode(self, h, skips, emb, context, key):
        """Up levels on the skips (consumed last first), GroupNorm, SiLU, conv_out -> (B, H, W, out) float32."""
        skips, pyramid, dt = list(skips), None, COMPUTE_DTYPES[self.config.dtype]
        for level in self.up:
            for j, res in enumerate(level.res):
                h = res(jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1), emb, key())
                attn = level.attention_after(j)
                h = h if attn is None else attn(h, context)
            if pyramid is not None:                                  # the output pyramid, up to this level
                pyramid = upsample_2d(pyramid, self.config.resample_filter)
            if level.skip_conv is not None:
                out = level.skip_conv(nnx.silu(level.skip_norm(h)).astype(dt))
                pyramid = out if pyramid is None else pyramid + out
            if level.resample is not None:
                h = level.apply_resample(h, emb, key)

        h = self.conv_out(nnx.silu(self.norm_out(h)).astype(dt))
        h = h if pyramid is None else h + pyramid
        return h.astype(jnp.float32)
