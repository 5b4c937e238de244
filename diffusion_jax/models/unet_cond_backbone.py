"""The cross-attention U-Net (`unet_cond.UNetCond`, diffusers' UNet2DConditionModel layout) as a backbone of the
training loop (`model.name = "unet_cond"`), configured in the same words as `unet.UNetConfig`:

    block i (resolution image_size / 2^i)  block_out_channels[i] = channels * channel_mult[i]
                                           CrossAttn{Down,Up}Block2D if that resolution is in
                                           attention_resolutions, else {Down,Up}Block2D; mid: UNetMidBlock2DCrossAttn
    num_res_blocks, num_heads, num_groups  layers_per_block, num_attention_heads, norm_num_groups
    num_classes                            num_class_embeds = num_classes + 1 (the last one is the null class of
                                           classifier-free guidance, as for `UNet`)
    context_dim                            cross_attention_dim: the transformers attend to a (B, L, context_dim)
                                           context (latent text-to-image); None: their second attention attends to
                                           the feature map (diffusers' double_self_attention), no context taken
    guidance_embed_dim                     time_cond_proj_dim: a guidance-distilled student (LCM) takes guidance=w

Called like every backbone: net(x, t, y=None, context=None, *, train=False, dropout_key=None); y=None on a
class-conditional network is the null class.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.layers import add_residuals
from diffusion_jax.models.unet_shape import UNetShape
from diffusion_jax.models.unet_cond import UNetCond, UNetCondConfig


@dataclasses.dataclass(frozen=True)
class UNetCondBackboneConfig(UNetShape):
    """`model` section of `model.name="unet_cond"`; errors name keys as `model.<field>`."""

    name: str = "unet_cond"
    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None         # None -> in_channels, doubled when learn_sigma
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)   # feature-map sizes with a spatial transformer
    num_heads: int = 4
    transformer_layers: int = 1              # BasicTransformerBlocks per spatial transformer
    dropout: float = 0.0
    num_groups: int = 32
    num_classes: int | None = None           # class-conditional; label == num_classes is the null class
    context_dim: int | None = None           # cross-attention on a (B, L, context_dim) context
    learn_sigma: bool = False
    dtype: str = "float32"
    guidance_embed_dim: int | None = None    # time_cond_proj_dim: a guidance-distilled student (LCM) takes w (B,)

    def diffusers_config(self) -> UNetCondConfig:
        """The UNetCondConfig (diffusers' names) that this section describes (module docstring)."""
        attn = [r in self.attention_resolutions for r in self.resolutions]
        return UNetCondConfig(
            in_channels=self.in_channels, out_channels=self.resolved_out_channels, sample_size=self.image_size,
            block_out_channels=tuple(self.channels * m for m in self.channel_mult),
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=self.num_res_blocks,
            num_attention_heads=self.num_heads, transformer_layers_per_block=self.transformer_layers,
            cross_attention_dim=self.context_dim, norm_num_groups=self.num_groups, dropout=self.dropout,
            num_class_embeds=None if self.num_classes is None else self.num_classes + 1, dtype=self.dtype,
            time_cond_proj_dim=self.guidance_embed_dim)

    def validate(self) -> None:
        self.validate_shape("unet_cond")
        if isinstance(self.transformer_layers, bool) or not isinstance(self.transformer_layers, int) \
                or self.transformer_layers < 1:
            raise ValueError(f"model.transformer_layers={self.transformer_layers!r} must be a positive int")
        for c in (self.channels * m for m in self.channel_mult):
            if c % self.num_heads:
                raise ValueError(f"model.num_heads={self.num_heads} must divide every block's width (got {c})")
        self.diffusers_config().validate()


class UNetCondBackbone(nnx.Module):
    """UNetCond of `config.diffusers_config()`, taking y=None on a class-conditional network as the null class."""

    def __init__(self, config: UNetCondBackboneConfig, *, rngs: nnx.Rngs, encoder_only: bool = False):
        config.validate()
        self.num_classes = config.num_classes
        self.net = UNetCond(config.diffusers_config(), rngs=rngs, encoder_only=encoder_only)
        self.skip_channels = self.net.skip_channels

    def __call__(self, x, t, y=None, context=None, *, residuals=None, train: bool = False, dropout_key=None,
                 guidance=None):
        x, emb, context, key = self.prepare(x, t, y, context, train=train, dropout_key=dropout_key, guidance=guidance)
        skips, h = self.encode(x, emb, context, key)
        skips, h = add_residuals(skips, h, residuals)
        return self.decode(h, skips, emb, context, key)

    def prepare(self, x, t, y=None, context=None, *, train: bool = False, dropout_key=None, guidance=None):
        if self.num_classes is not None and y is None:
            y = jnp.full((jnp.shape(x)[0],), self.num_classes, jnp.int32)
        return self.net.prepare(x, t, y, context, train=train, dropout_key=dropout_key, guidance=guidance)

    def encode(self, x, emb, context, key, hint=None):
        return self.net.encode(x, emb, context, key, hint)

    def decode(self, h, skips, emb, context, key):
        return self.net.decode(h, skips, emb, context, key)
