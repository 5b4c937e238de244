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
    zero) is what this U-Net always does. Not implemented: NCSN++'s progressive input / output
    pyramids, and its single attention block per decoder level (here: one after each ResBlock).

Used functionally:
    model = UNet(UNetConfig(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)   # params is the only state
    out = jax.jit(lambda p, x, t: nnx.merge(graphdef, p)(x, t))(params, x, t)
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.layers import (
    ACTIVATIONS,
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    add_residuals,
    check_network_inputs,
    conv,
    fourier_embedding,
    fourier_frequencies,
    group_norm,
    linear,
    timestep_embedding,
)
from diffusion_jax.models.resample import RESAMPLE_FILTERS
from diffusion_jax.models.unet_shape import UNetShape

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_CHOICES = {"time_embedding": ("positional", "fourier"), "resblock": ("ddpm", "biggan"),
            "resample_filter": RESAMPLE_FILTERS, "act_fn": tuple(ACTIVATIONS),
            "resnet_time_scale_shift": ("default", "scale_shift")}


@dataclasses.dataclass(frozen=True)
class UNetConfig(UNetShape):
    """Hyper-parameters of `UNet`; errors name keys as `model.<field>`."""

    name: str = "unet"                      # the backbone (models/registry.py)
    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None        # None -> in_channels, doubled when learn_sigma
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)   # feature-map sizes (pixels) with self-attention
    num_heads: int = 1
    dropout: float = 0.1
    num_groups: int = 32                    # GroupNorm groups
    num_classes: int | None = None          # class-conditional; label == num_classes is the null class
    context_dim: int | None = None          # cross-attention on a (B, L, context_dim) context
    learn_sigma: bool = False               # output 2*C channels (improved DDPM learned variance)
    dtype: str = "float32"                  # compute dtype ("float32" | "bfloat16"); params float32
    # score_sde DDPM++ / NCSN++ options (Song et al. 2021); the defaults are DDPM's.
    time_embedding: str = "positional"      # "positional": DDPM sinusoids of t, width `channels`;
    #   "fourier": Gaussian Fourier features [sin(2 pi W s), cos(2 pi W s)], width 2 * channels, of
    #   s = log(t) (t = sigma, VE) or s = t; W ~ N(0, fourier_scale^2), fixed (not a Param)
    fourier_scale: float = 16.0             # std of the Fourier frequencies W (score_sde: 16)
    fourier_log_input: bool = True          # fourier: embed log(t) (score_sde NCSN++ gets sigma > 0);
    #   False embeds t as given (e.g. EDM's c_noise = ln(sigma) / 4, already a log)
    resblock: str = "ddpm"                  # "ddpm": separate Downsample / Upsample layers (3x3 conv);
    #   "biggan": ResBlocks that resample inside the block (score_sde ResnetBlockBigGANpp)
    resample_filter: str = "plain"          # "plain": nearest up / stride-2 conv or 2x2 mean down;
    #   "fir": StyleGAN2 upfirdn2d with the [1, 3, 3, 1] kernel
    skip_rescale: bool = False              # residual sums (ResBlocks, attention) scaled by 1/sqrt(2)
    # diffusers UNet2DModel options, named as in its config.json; the defaults are DDPM's (google/ddpm-cifar10-32),
    # diffusers' own defaults are True, 0, 1, 1e-5
    flip_sin_to_cos: bool = False           # positional time embedding: [cos, sin] instead of [sin, cos]
    freq_shift: float = 1.0                 # its frequencies 10000**(-i / (channels / 2 - freq_shift))
    downsample_padding: int = 0             # 0: pad the bottom / right by one before the stride-2 conv; 1: every side
    norm_eps: float = 1e-6                  # epsilon of every GroupNorm
    act_fn: str = "silu"                    # the ResBlocks' nonlinearity (silu | swish | mish | gelu)
    resnet_time_scale_shift: str = "default"   # "scale_shift": ADM's FiLM, norm(h) (1 + scale) + shift
    center_input_sample: bool = False       # the network sees 2 x - 1
    mid_block_scale_factor: float = 1.0     # the middle block's residual sums are divided by it
    add_attention: bool = True              # False: no attention in the middle block
    attn_norm_num_groups: int | None = None   # GroupNorm groups of the middle block's attention (None: num_groups)
    head_dim: int | None = None             # heads per attention block = its channels // head_dim (None: num_heads)
    resample_shortcut: bool = True          # biggan: a 1x1 conv on the resampled x (score_sde); False: none when
    #   the widths match (diffusers' downsample_type / upsample_type "resnet", Resnet{Down,Up}sampleBlock2D)

    def validate(self) -> None:
        """Raise ValueError naming the offending key (e.g. `model.image_size`)."""
        self.validate_shape("unet")
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} must be one of {sorted(_DTYPES)}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be one of {list(choices)}")
        scale = self.fourier_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale < float("inf"):
            raise ValueError(f"model.fourier_scale={scale!r} must be a positive finite float")
        for name in ("fourier_log_input", "skip_rescale", "flip_sin_to_cos", "center_input_sample", "add_attention",
                     "resample_shortcut"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be a bool")
        shift = self.freq_shift
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 <= shift < self.channels // 2:
            raise ValueError(f"model.freq_shift={shift!r} must be a number in [0, model.channels / 2)")
        if self.downsample_padding not in (0, 1) or isinstance(self.downsample_padding, bool):
            raise ValueError(f"model.downsample_padding={self.downsample_padding!r} must be 0 (DDPM) or 1 (diffusers)")
        if self.downsample_padding and (self.resblock != "ddpm" or self.resample_filter != "plain"):
            raise ValueError("model.downsample_padding=1 pads the plain stride-2 conv of resblock='ddpm', "
                             f"resample_filter='plain'; this model has {self.resblock!r}, {self.resample_filter!r}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"model.norm_eps={eps!r} must be a number in (0, 1)")
        f = self.mid_block_scale_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < float("inf"):
            raise ValueError(f"model.mid_block_scale_factor={f!r} must be a positive number")
        for name in ("attn_norm_num_groups", "head_dim"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"model.{name}={v!r} must be None or a positive int")
        if self.learn_sigma and self.out_channels is not None and self.out_channels % 2:
            raise ValueError(f"model.out_channels={self.out_channels} must be even when model.learn_sigma=True")


class _Level(nnx.Module):
    """One resolution level: ResBlocks, attention after each (if any), optional resampling."""

    def __init__(self, res: list, attn: list, resample):
        self.res = nnx.List(res)
        self.attn = nnx.List(attn)  # empty, or one AttentionBlock per ResBlock
        self.resample = resample    # Downsample / Upsample / a resampling ResBlock (biggan) / None

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
    `skip_rescale` (the U-Net's concatenated skips are not).
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, encoder_only: bool = False):
        config.validate()
        self.config = config
        c = config
        dt = _DTYPES[c.dtype]
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
        self.class_embed = (nnx.Embed(c.num_classes + 1, emb_dim, rngs=rngs)
                            if c.num_classes is not None else None)
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
            down.append(_Level(res, attns, None if last else resampler(ch, "down")))
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
                if use_attn:
                    attns.append(attn(ch))
            up.append(_Level(res, attns, resampler(ch, "up") if i > 0 else None))
        self.up = nnx.List(up)

        self.norm_out = group_norm(ch, c.num_groups, rngs, c.norm_eps)
        self.conv_out = conv(ch, c.resolved_out_channels, 3, rngs, dt, zero=True)

    def time_features(self, t) -> jax.Array:
        """The parameter-free time embedding fed to `time_embed_1`.

        "positional": DDPM sinusoids of t, (B, channels). "fourier": [sin(2 pi W s), cos(2 pi W s)]
        with s = log(t) if `fourier_log_input` else t and W = fourier_frequencies(channels,
        fourier_scale), (B, 2 channels). t: (B,) float.
        """
        c = self.config
        t = jnp.asarray(t, jnp.float32)
        if c.time_embedding == "fourier":
            s = jnp.log(t) if c.fourier_log_input else t
            return fourier_embedding(s, fourier_frequencies(c.channels, c.fourier_scale))
        return timestep_embedding(t, c.channels, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)

    def __call__(self, x, t, y=None, context=None, *, residuals=None, train: bool = False, dropout_key=None):
        """Predict from a noisy batch.

        Args:
          x: (B, H, W, in_channels) float.
          t: (B,) (or scalar) float or int network time: timesteps in DDPM units (0..T-1, may be
            fractional) for "positional"; for "fourier" the noise level sigma > 0 (its log is
            embedded, score_sde NCSN++) or, with fourier_log_input=False, the value to embed.
          y: (B,) int labels in [0, num_classes] (num_classes = null class), or None (-> null class);
            must be None for an unconditional model.
          context: (B, L, context_dim), required iff `context_dim` is set.
          residuals: ControlNet residuals (down, mid) added to the skips and the middle block's output
            (`layers.add_residuals`), or None.
          train: apply dropout, with randomness from `dropout_key` (one fold per ResBlock).
        Returns:
          (B, H, W, resolved_out_channels) float32.
        """
        x, emb, context, key = self.prepare(x, t, y, context, train=train, dropout_key=dropout_key)
        skips, h = self.encode(x, emb, context, key)
        skips, h = add_residuals(skips, h, residuals)
        return self.decode(h, skips, emb, context, key)

    def prepare(self, x, t, y=None, context=None, *, train: bool = False, dropout_key=None):
        """Checked inputs -> (x in the compute dtype, emb (B, 4 channels), context, key) with key() the next
        dropout key (None without dropout); the arguments are those of `__call__`."""
        c = self.config
        dt = _DTYPES[c.dtype]
        x, t, use_dropout = check_network_inputs(x, t, c.in_channels, train and c.dropout > 0, dropout_key)
        x = 2 * x - 1 if c.center_input_sample else x
        b = x.shape[0]

        if self.class_embed is None and y is not None:
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

        emb = self.time_embed_2(nnx.silu(self.time_embed_1(self.time_features(t))))
        if self.class_embed is not None:
            emb = emb + self.class_embed(y)
        counter = itertools.count()
        key = lambda: jax.random.fold_in(dropout_key, next(counter)) if use_dropout else None  # noqa: E731
        return x.astype(dt), emb.astype(dt), context, key

    def encode(self, x, emb, context, key, hint=None):
        """conv_in (+ hint, a ControlNet's conditioning features), down levels, middle block ->
        (skips: one (B, h, w, skip_channels[i]) per skip, h: the middle block's output)."""
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint.astype(h.dtype)
        skips = [h]
        for level in self.down:
            for j, res in enumerate(level.res):
                h = res(h, emb, key())
                if len(level.attn):
                    h = level.attn[j](h, context)
                skips.append(h)
            if level.resample is not None:
                h = level.apply_resample(h, emb, key)
                skips.append(h)

        h = self.mid_res1(h, emb, key())
        h = h if self.mid_attn is None else self.mid_attn(h, context)
        return skips, self.mid_res2(h, emb, key())

    def decode(self, h, skips, emb, context, key):
        """Up levels on the skips (consumed last first), GroupNorm, SiLU, conv_out -> (B, H, W, out) float32."""
        skips = list(skips)
        for level in self.up:
            for j, res in enumerate(level.res):
                h = res(jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1), emb, key())
                if len(level.attn):
                    h = level.attn[j](h, context)
            if level.resample is not None:
                h = level.apply_resample(h, emb, key)

        h = self.conv_out(nnx.silu(self.norm_out(h)).astype(_DTYPES[self.config.dtype]))
        return h.astype(jnp.float32)
