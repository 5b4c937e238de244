"""`UNetConfig`: the hyper-parameters of the DDPM / ADM / NCSN++ U-Net (`models/unet.py`, which documents the
layout and the papers), with the checks that name the offending key (`model.<field>`)."""
from __future__ import annotations

import dataclasses
import math


from diffusion_jax.models.layers import ACTIVATIONS, COMPUTE_DTYPES
from diffusion_jax.models.resample import RESAMPLE_FILTERS
from diffusion_jax.models.unet_shape import UNetShape

_CHOICES = {"time_embedding": ("positional", "fourier"), "resblock": ("ddpm", "biggan"),
            "resample_filter": RESAMPLE_FILTERS, "act_fn": tuple(ACTIVATIONS),
            "resnet_time_scale_shift": ("default", "scale_shift"), "up_attention": ("each", "last"),
            "class_embed_type": (None, "timestep", "identity")}


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
    # NCSN++ as diffusers' UNet2DModel builds it (google/ncsnpp-*: Skip*Block2D, time_embedding_type "fourier")
    fourier_weights: tuple[float, ...] | None = None   # fourier: these `channels` frequencies W (diffusers'
    #   time_proj.weight) instead of fourier_frequencies(channels, fourier_scale)
    scale_by_sigma: bool = False            # the output is divided by t, the noise level (score_sde scale_by_sigma)
    skip_pyramid: bool = False              # NCSN++'s image pyramids (diffusers Skip*Block2D; score_sde progressive
    #   input_skip / output_skip): x resampled level by level enters each downsampled level through a 1x1 conv; each
    #   up level adds conv3x3(act(norm(h))) to the upsampled output pyramid, which is added to the output
    up_attention: str = "each"              # "each": attention after every up-level ResBlock; "last": one after the
    #   level's last ResBlock (diffusers AttnSkipUpBlock2D)
    class_embed_type: str | None = None     # y's embedding: None: a table of num_classes labels (+ the null class);
    #   "timestep": y (B,) float through the time features and an MLP of its own; "identity": y (B, 4 channels) added
    guidance_embed_dim: int | None = None   # a guidance-distilled student (config.distill) takes the guidance weight
    #   w (B,) as input: guidance_embedding(w, dim) projected onto the time features (layers.GuidanceProjection)

    def validate(self) -> None:
        """Raise ValueError naming the offending key (e.g. `model.image_size`)."""
        self.validate_shape("unet")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} must be one of {sorted(COMPUTE_DTYPES)}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be one of {list(choices)}")
        scale = self.fourier_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale < float("inf"):
            raise ValueError(f"model.fourier_scale={scale!r} must be a positive finite float")
        for name in ("fourier_log_input", "skip_rescale", "flip_sin_to_cos", "center_input_sample", "add_attention",
                     "resample_shortcut", "scale_by_sigma", "skip_pyramid"):
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
        self._validate_ncsnpp()
        if self.learn_sigma and self.out_channels is not None and self.out_channels % 2:
            raise ValueError(f"model.out_channels={self.out_channels} must be even when model.learn_sigma=True")

    def _validate_ncsnpp(self) -> None:
        w = self.fourier_weights
        if w is not None:
            if self.time_embedding != "fourier":
                raise ValueError(f"model.fourier_weights are the frequencies of time_embedding='fourier'; this model "
                                 f"has time_embedding={self.time_embedding!r}")
            if not isinstance(w, tuple) or len(w) != self.channels or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in w):
                raise ValueError(f"model.fourier_weights must be {self.channels} (model.channels) finite numbers, got "
                                 f"{len(w) if isinstance(w, tuple) else type(w).__name__}")
        if self.class_embed_type is not None and self.num_classes is not None:
            raise ValueError(f"model.class_embed_type={self.class_embed_type!r} embeds y itself; model.num_classes "
                             f"must be None, got {self.num_classes}")
