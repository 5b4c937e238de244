"""The cross-attention U-Net of latent diffusion / Stable Diffusion 1.x (diffusers `UNet2DConditionModel`), NHWC.

References:
  Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models": a U-Net on VAE
    latents with spatial transformers (self-attention, cross-attention to a text-encoder sequence, GEGLU
    feed-forward) after the ResBlocks of the higher-resolution levels.
  diffusers `models/unets/unet_2d_condition.py` and `unet_2d_blocks.py` (CrossAttnDownBlock2D,
    DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D): the layout, the names and the
    configuration replicated here, so that `convert_unet_cond` maps a diffusers state_dict name for name.
    The defaults of `UNetCondConfig` are Stable Diffusion 1.x's (859,520,964 parameters).

Used functionally, like `UNet`, with the library's apply convention:
    model = UNetCond(UNetCondConfig(), rngs=nnx.Rngs(0))
    graphdef, params = functional.split_params(model)
    eps = functional.make_apply_fn(graphdef)(params, x, t, None, context)   # context (B, L, 768)
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.layers import (COMPUTE_DTYPES, add_residuals, check_guidance, check_network_inputs,
                                        timestep_embedding)
from diffusion_jax.models.unet_cond_blocks import (Block, Downsample2D, ResnetBlock2D, TimestepEmbedding,
                                                   Transformer2DModel, Upsample2D, conv, group_norm)

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers config keys read into UNetCondConfig (diffusers name -> field name).
_FIELDS = {k: k for k in (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
    "down_block_types", "mid_block_type", "up_block_types", "block_out_channels", "layers_per_block",
    "downsample_padding", "mid_block_scale_factor", "dropout", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "use_linear_projection", "num_class_embeds",
    "upcast_attention", "time_embedding_dim", "conv_in_kernel", "conv_out_kernel", "time_cond_proj_dim")}
_FIELDS["attention_head_dim"] = "num_attention_heads"  # diffusers' historic name: it is the head COUNT
# diffusers options not implemented: key -> (accepted values, diffusers default).
_ONLY = {
    "act_fn": (("silu", "swish"), "silu"),
    "time_embedding_type": (("positional",), "positional"),
    "resnet_time_scale_shift": (("default",), "default"),
    "attention_type": (("default",), "default"),
    "dual_cross_attention": ((False,), False),
    "class_embed_type": ((None,), None),
    "class_embeddings_concat": ((False,), False),
    "projection_class_embeddings_input_dim": ((None,), None),
    "addition_embed_type": ((None,), None),
    "addition_time_embed_dim": ((None,), None),
    "encoder_hid_dim": ((None,), None),
    "encoder_hid_dim_type": ((None,), None),
    "time_embedding_act_fn": ((None,), None),
    "timestep_post_act": ((None,), None),
    "resnet_skip_time_act": ((False,), False),
    "cross_attention_norm": ((None,), None),
    "reverse_transformer_layers_per_block": ((None,), None),
    "mid_block_only_cross_attention": ((None, False), None),
    # diffusers itself refuses num_attention_heads (its issue 2011): the head count is attention_head_dim.
    "num_attention_heads": ((None,), None),
}
# Read by diffusers only for block types (ResnetDownsampleBlock2D, ...) or embeddings refused above.
_IRRELEVANT = ("resnet_out_scale_factor", "addition_embed_type_num_heads")


def _strip(name):
    """diffusers' get_down_block / get_up_block accept a "UNetRes" prefix."""
    return name[7:] if isinstance(name, str) and name.startswith("UNetRes") else name


@dataclasses.dataclass(frozen=True)
class UNetCondConfig:
    """UNet2DConditionModel hyper-parameters (diffusers names; per-block values as an int or a tuple)."""
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | None = 64            # latent size the model was trained at (metadata only)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: int | tuple[int, ...] = 2
    num_attention_heads: int | tuple[int, ...] = 8  # heads per block (diffusers' `attention_head_dim`)
    transformer_layers_per_block: int | tuple[int, ...] = 1
    cross_attention_dim: int | None = 768   # context width (CLIP ViT-L/14 for SD 1.x); None: no context, the
    #   transformers' second attention attends to the feature map itself (diffusers' double_self_attention)
    use_linear_projection: bool = False     # proj_in / proj_out Linear (SD 2.x) instead of 1x1 conv
    norm_num_groups: int = 32
    norm_eps: float = 1e-5                  # ResBlocks and conv_norm_out
    flip_sin_to_cos: bool = True            # timestep embedding [cos, sin] (True) or [sin, cos]
    freq_shift: float = 0                   # frequencies exp(-ln(1e4) i / (half - freq_shift))
    time_embedding_dim: int | None = None   # None: 4 * block_out_channels[0]
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0     # mid-block ResBlock outputs are divided by it
    dropout: float = 0.0                    # ResBlock dropout (train=True)
    center_input_sample: bool = False       # x -> 2 x - 1 first
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    num_class_embeds: int | None = None     # class embedding added to the time embedding; y required
    time_cond_proj_dim: int | None = None   # LCM: the guidance weight w's embedding (layers.guidance_embedding) is
    #   projected onto the time sinusoids by time_embedding.cond_proj; guidance (B,) required
    upcast_attention: bool = False          # kept for round trips: attention logits are always float32
    dtype: str = "float32"                  # compute dtype ("float32" | "bfloat16"); params float32

    def __post_init__(self):
        for f in dataclasses.fields(self):  # lists (json, ml_collections) -> tuples, keeping it hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

    def per_block(self, name: str) -> tuple:
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def has_cross_attention(self) -> bool:
        """Whether the network attends to a context (B, L, cross_attention_dim), which it then requires."""
        has_transformers = (self.mid_block_type is not None or "CrossAttnDownBlock2D" in self.down_block_types
                            or "CrossAttnUpBlock2D" in self.up_block_types)
        return has_transformers and self.cross_attention_dim is not None

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any], **overrides) -> UNetCondConfig:
        """The config equivalent to a diffusers UNet2DConditionModel config.json (or `model.config`).

        Raises ValueError naming the key of any option not implemented, or unknown. `overrides` (e.g.
        dtype="bfloat16", dropout=0.1) are applied last.
        """
        cfg = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
        for key, (allowed, default) in _ONLY.items():
            if cfg.get(key, default) not in allowed:
                raise ValueError(f"diffusers config {key}={cfg[key]!r} is not supported "
                                 f"(UNetCond implements {' / '.join(map(repr, allowed))})")
        only_cross = cfg.get("only_cross_attention", False)
        if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
            raise ValueError(f"diffusers config only_cross_attention={only_cross!r} is not supported (need False)")
        unknown = sorted(set(cfg) - set(_FIELDS) - set(_ONLY) - set(_IRRELEVANT) - {"only_cross_attention"})
        if unknown:
            raise ValueError(f"diffusers config keys {unknown} are not known to UNetCondConfig.from_diffusers")
        kwargs = {_FIELDS[k]: v for k, v in cfg.items() if k in _FIELDS}
        for key in ("down_block_types", "up_block_types", "mid_block_type"):
            if key in kwargs:
                value = kwargs[key]
                kwargs[key] = tuple(map(_strip, value)) if isinstance(value, (list, tuple)) else _strip(value)
        ca = kwargs.get("cross_attention_dim", 1280)   # diffusers' default
        if isinstance(ca, (list, tuple)):
            if len(set(ca)) != 1:
                raise ValueError(f"diffusers config cross_attention_dim={ca!r}: per-block context widths are "
                                 "not supported (one context feeds every block)")
            ca = ca[0]
        kwargs["cross_attention_dim"] = ca
        size = kwargs.get("sample_size")
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"diffusers config sample_size={size!r} must be square")
            kwargs["sample_size"] = size[0]
        defaults = dict(sample_size=None, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
                        block_out_channels=(320, 640, 1280, 1280), num_attention_heads=8,
                        cross_attention_dim=1280)  # diffusers' defaults where ours (SD 1.x) differ
        config = cls(**{**defaults, **kwargs, **overrides})
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError naming the offending key (e.g. `model.block_out_channels`)."""

        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}={value!r} must be a positive int")

        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("model.block_out_channels must be a non-empty tuple of ints")
        for name in ("in_channels", "out_channels", "norm_num_groups", "conv_in_kernel", "conv_out_kernel"):
            positive_int(name, getattr(self, name))
        for name in ("num_class_embeds", "time_embedding_dim", "sample_size", "cross_attention_dim",
                     "time_cond_proj_dim"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be odd")
        for name in ("block_out_channels", "layers_per_block", "num_attention_heads", "transformer_layers_per_block"):
            values = self.per_block(name)
            if len(values) != n:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must have one entry per block ({n})")
            for i, v in enumerate(values):
                positive_int(f"{name}[{i}]", v)
        for name, types, choices in (("down_block_types", self.down_block_types, DOWN_TYPES),
                                     ("up_block_types", self.up_block_types, UP_TYPES)):
            if len(types) != n:
                raise ValueError(f"model.{name}={types!r} must have one entry per block ({n})")
            for t in types:
                if t not in choices:
                    raise ValueError(f"model.{name} contains {t!r}; supported: {list(choices)}")
        if self.mid_block_type not in MID_TYPES:
            raise ValueError(f"model.mid_block_type={self.mid_block_type!r} is not supported; "
                             f"supported: {list(MID_TYPES)}")
        for i, ch in enumerate(self.block_out_channels):
            if ch % self.norm_num_groups:
                raise ValueError(f"model.block_out_channels[{i}]={ch} is not divisible by "
                                 f"model.norm_num_groups={self.norm_num_groups}")
            if self.per_block("num_attention_heads")[i] > ch:
                raise ValueError(f"model.num_attention_heads[{i}]={self.per_block('num_attention_heads')[i]} "
                                 f"exceeds the {ch} channels of block {i}")
        if isinstance(self.downsample_padding, bool) or not isinstance(self.downsample_padding, int) \
                or self.downsample_padding < 0:
            raise ValueError(f"model.downsample_padding={self.downsample_padding!r} must be an int >= 0")
        for name in ("norm_eps", "mid_block_scale_factor", "freq_shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"model.{name}={value!r} must be a finite number")
        if self.norm_eps <= 0 or self.mid_block_scale_factor == 0:
            raise ValueError("model.norm_eps must be > 0 and model.mid_block_scale_factor != 0")
        if self.freq_shift >= self.block_out_channels[0] // 2:
            raise ValueError(f"model.freq_shift={self.freq_shift} must be < block_out_channels[0] // 2")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"model.dropout={self.dropout!r} must be in [0, 1)")
        for name in ("use_linear_projection", "flip_sin_to_cos", "center_input_sample", "upcast_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be a bool")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} must be one of {sorted(COMPUTE_DTYPES)}")


class UNetCond(nnx.Module):
    """diffusers UNet2DConditionModel (see the module docstring). Layout (n blocks, C_i = block_out_channels[i]):
      t -> sinusoids(C_0) -> time_embedding (Linear, SiLU, Linear) = emb (+ class_embedding(y))
      conv_in -> down i: layers_per_block[i] x [ResBlock (+ Transformer2DModel)], Downsample2D unless last
      -> mid: ResBlock, Transformer2DModel, ResBlock ->
      up i (C reversed): (layers_per_block + 1) x [concat skip, ResBlock (+ Transformer2DModel)],
        Upsample2D unless last -> conv_norm_out, SiLU, conv_out.
    """

    def __init__(self, config: UNetCondConfig, *, rngs: nnx.Rngs, encoder_only: bool = False):
        config.validate()
        self.config = c = config
        dt = COMPUTE_DTYPES[c.dtype]
        boc, n = c.block_out_channels, len(c.block_out_channels)
        temb = c.time_embed_dim
        heads, layers = c.per_block("num_attention_heads"), c.per_block("layers_per_block")
        tlayers = c.per_block("transformer_layers_per_block")

        def resnet(cin, cout, scale=1.0):
            return ResnetBlock2D(cin, cout, temb, groups=c.norm_num_groups, eps=c.norm_eps,
                                 dropout_rate=float(c.dropout), output_scale_factor=scale, dtype=dt, rngs=rngs)

        def transformer(ch, i):
            return Transformer2DModel(ch, heads[i], layers=tlayers[i], context_dim=c.cross_attention_dim,
                                      groups=c.norm_num_groups, use_linear_projection=c.use_linear_projection,
                                      dtype=dt, rngs=rngs)

        self.conv_in = conv(c.in_channels, boc[0], c.conv_in_kernel, rngs, dt)
        self.time_embedding = TimestepEmbedding(boc[0], temb, cond_proj_dim=c.time_cond_proj_dim, rngs=rngs)
        self.class_embedding = (nnx.Embed(c.num_class_embeds, temb, rngs=rngs)
                                if c.num_class_embeds is not None else None)

        down, out_ch = [], boc[0]
        for i, kind in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            res = [resnet(in_ch if j == 0 else out_ch, out_ch) for j in range(layers[i])]
            attn = [transformer(out_ch, i) for _ in res] if kind == "CrossAttnDownBlock2D" else []
            ds = [Downsample2D(out_ch, padding=c.downsample_padding, dtype=dt, rngs=rngs)] if i < n - 1 else None
            down.append(Block(res, attn, downsamplers=ds))
        self.down_blocks = nnx.List(down)

        s = float(c.mid_block_scale_factor)
        self.mid_block = (Block([resnet(boc[-1], boc[-1], s), resnet(boc[-1], boc[-1], s)],
                                 [transformer(boc[-1], n - 1)]) if c.mid_block_type is not None else None)
        # width of each skip, in the order `encode` returns them: conv_in, then every ResBlock and Downsample2D
        self.skip_channels = (boc[0],) + tuple(
            ch for i in range(n) for ch in [boc[i]] * layers[i] + ([boc[i]] if i < n - 1 else []))
        if encoder_only:   # a ControlNet's trainable copy (diffusers ControlNetModel, models/controlnet.py)
            return

        up, rev = [], boc[::-1]
        out_ch = rev[0]
        for i, kind in enumerate(c.up_block_types):
            prev_ch, out_ch, in_ch = out_ch, rev[i], rev[min(i + 1, n - 1)]
            k = layers[n - 1 - i] + 1
            res = [resnet((prev_ch if j == 0 else out_ch) + (in_ch if j == k - 1 else out_ch), out_ch)
                   for j in range(k)]
            attn = [transformer(out_ch, n - 1 - i) for _ in res] if kind == "CrossAttnUpBlock2D" else []
            us = [Upsample2D(out_ch, dtype=dt, rngs=rngs)] if i < n - 1 else None
            up.append(Block(res, attn, upsamplers=us))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = group_norm(boc[0], c.norm_num_groups, rngs, c.norm_eps)
        self.conv_out = conv(boc[0], c.out_channels, c.conv_out_kernel, rngs, dt, zero=True)

    def __call__(self, x, t, y=None, context=None, *, residuals=None, train: bool = False, dropout_key=None,
                 guidance=None):
        """Predict from a noisy batch (diffusers' `sample`, `timestep`, `class_labels`, `encoder_hidden_states`).

        Args:
          x: (B, H, W, in_channels) float (any H, W: odd skip sizes are matched as diffusers does).
          t: (B,) or scalar timesteps (0..999 for SD; may be fractional).
          y: (B,) int class labels, required iff `num_class_embeds` is set; else must be None.
          context: (B, L, cross_attention_dim), required iff the model has cross-attention.
          residuals: ControlNet residuals (down, mid) (diffusers' down_block_additional_residuals,
            mid_block_additional_residual; `layers.add_residuals`), or None.
          train: apply ResBlock dropout, with randomness from `dropout_key` (one fold per ResBlock).
          guidance: (B,) classifier-free guidance weights w (1 = none), required iff `time_cond_proj_dim` is set;
            diffusers' timestep_cond is guidance_embedding(w) (its LCM pipelines embed w - 1 likewise).
        Returns:
          (B, H, W, out_channels) float32.
        """
        x, emb, context, key = self.prepare(x, t, y, context, train=train, dropout_key=dropout_key, guidance=guidance)
        skips, h = self.encode(x, emb, context, key)
        skips, h = add_residuals(skips, h, residuals)
        return self.decode(h, skips, emb, context, key)

    def prepare(self, x, t, y=None, context=None, *, train: bool = False, dropout_key=None, guidance=None):
        """Checked inputs -> (x in the compute dtype, emb (B, time_embed_dim), context, key) with key() the next
        dropout key (None without dropout); the arguments are those of `__call__`."""
        c = self.config
        dt = COMPUTE_DTYPES[c.dtype]
        x, t, use_dropout = check_network_inputs(x, t, c.in_channels, train and c.dropout > 0, dropout_key)
        b = x.shape[0]
        if self.class_embedding is None and y is not None:
            raise ValueError("class labels y were given but the model has no class embedding "
                             "(model.num_class_embeds is None)")
        if self.class_embedding is not None:
            if y is None:
                raise ValueError(f"the model is class-conditional (model.num_class_embeds={c.num_class_embeds}); "
                                 "pass labels y of shape (B,)")
            y = jnp.asarray(y).astype(jnp.int32)
            if y.shape != (b,):
                raise ValueError(f"y must have shape ({b},), got {y.shape}")
        if c.has_cross_attention:
            if context is None:
                raise ValueError(f"the model has cross-attention (model.cross_attention_dim={c.cross_attention_dim});"
                                 " pass context of shape (B, L, cross_attention_dim)")
            context = jnp.asarray(context)
            if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != c.cross_attention_dim:
                raise ValueError(f"context must be ({b}, L, {c.cross_attention_dim}), got {context.shape}")
            context = context.astype(dt)
        elif context is not None:
            raise ValueError("context was given but the model has no cross-attention block")

        if c.center_input_sample:
            x = 2.0 * x - 1.0
        features = timestep_embedding(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                      freq_shift=c.freq_shift)
        emb = self.time_embedding(features, check_guidance(guidance, c.time_cond_proj_dim, b, "time_cond_proj_dim"))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(y)
        counter = itertools.count()
        key = lambda: jax.random.fold_in(dropout_key, next(counter)) if use_dropout else None  # noqa: E731
        return x.astype(dt), emb.astype(dt), context, key

    def encode(self, x, emb, context, key, hint=None):
        """conv_in (+ hint, a ControlNet's conditioning features), down blocks, mid block ->
        (skips: one (B, h, w, skip_channels[i]) per skip, h: the mid block's output)."""
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint.astype(h.dtype)
        skips = [h]
        for block in self.down_blocks:
            for j, res in enumerate(block.resnets):
                h = res(h, emb, key())
                if block.attentions is not None:
                    h = block.attentions[j](h, context)
                skips.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
                skips.append(h)

        if self.mid_block is not None:
            h = self.mid_block.resnets[0](h, emb, key())
            h = self.mid_block.attentions[0](h, context)
            h = self.mid_block.resnets[1](h, emb, key())
        return skips, h

    def decode(self, h, skips, emb, context, key):
        """Up blocks on the skips (consumed last first), conv_norm_out, SiLU, conv_out -> (B, H, W, out) float32."""
        skips = list(skips)
        # diffusers passes the skip's size to Upsample2D when H or W is not a multiple of 2**(n - 1).
        factor = 2 ** (len(self.up_blocks) - 1)
        size = skips[0].shape[1:3]
        match_sizes = size[0] % factor != 0 or size[1] % factor != 0
        for block in self.up_blocks:
            for j, res in enumerate(block.resnets):
                h = res(jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1), emb, key())
                if block.attentions is not None:
                    h = block.attentions[j](h, context)
            if block.upsamplers is not None:
                h = block.upsamplers[0](h, skips[-1].shape[1:3] if match_sizes else None)

        h = self.conv_out(nnx.silu(self.conv_norm_out(h)).astype(COMPUTE_DTYPES[self.config.dtype]))
        return h.astype(jnp.float32)
