"""The fields and checks every U-Net config shares (`unet.UNetConfig`, `unet_cond_backbone.UNetCondBackboneConfig`)."""
from __future__ import annotations


def output_channels(config) -> int:
    """A denoiser config's output width: out_channels, or in_channels (doubled with learn_sigma) when it is None."""
    if config.out_channels is not None:
        return config.out_channels
    return config.in_channels * (2 if config.learn_sigma else 1)


class UNetShape:
    """What every U-Net config (this one, `unet_cond_backbone.UNetCondBackboneConfig`) derives from and checks on
    the fields they share (name, image_size, in_channels, out_channels, channels, channel_mult, num_res_blocks,
    attention_resolutions, num_heads, num_groups, dropout, num_classes, context_dim, learn_sigma,
    guidance_embed_dim)."""

    def __post_init__(self):
        # Accept lists (e.g. from ml_collections) but keep the dataclass hashable.
        for name in ("channel_mult", "attention_resolutions", "fourier_weights"):
            value = getattr(self, name, None)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))

    @property
    def resolved_out_channels(self) -> int:
        return output_channels(self)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each level: image_size // 2**level."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    def validate_shape(self, name: str) -> None:
        """The checks every U-Net config shares (ValueError naming `model.<key>`): model.name, sizes and counts,
        channel_mult, dropout, image_size against the downsamplings, num_groups against every level's width,
        attention_resolutions against the feature-map sizes, num_heads against every attending level's width."""
        if self.name != name:
            raise ValueError(f"model.name={self.name!r} does not name this config ({name})")

        def positive_int(key, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key}={value!r} must be a positive int")

        for key in ("image_size", "in_channels", "channels", "num_res_blocks", "num_heads", "num_groups"):
            positive_int(key, getattr(self, key))
        for key in ("out_channels", "num_classes", "context_dim", "guidance_embed_dim"):
            if getattr(self, key) is not None:
                positive_int(key, getattr(self, key))
        if not isinstance(self.channel_mult, tuple) or not self.channel_mult:
            raise ValueError(f"model.channel_mult={self.channel_mult!r} must be a non-empty tuple of ints")
        for i, m in enumerate(self.channel_mult):
            positive_int(f"channel_mult[{i}]", m)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"model.dropout={self.dropout!r} must be in [0, 1)")
        n_down = len(self.channel_mult) - 1
        if self.image_size % 2**n_down:
            raise ValueError(
                f"model.image_size={self.image_size} is not divisible by 2**{n_down} = {2**n_down} "
                "(len(model.channel_mult)-1 downsamplings)")
        for i, m in enumerate(self.channel_mult):
            ch = self.channels * m
            if ch % self.num_groups:
                raise ValueError(
                    f"model.channels * model.channel_mult[{i}] = {ch} is not divisible by "
                    f"model.num_groups={self.num_groups}")
        resolutions = self.resolutions
        for r in self.attention_resolutions:
            if r not in resolutions:
                raise ValueError(
                    f"model.attention_resolutions contains {r}, which never occurs; the feature-map "
                    f"sizes are {list(resolutions)}")
        attn_levels = [i for i, r in enumerate(resolutions) if r in self.attention_resolutions]
        head_dim, groups = getattr(self, "head_dim", None), getattr(self, "attn_norm_num_groups", None)
        for i in attn_levels + [len(self.channel_mult) - 1]:  # the middle block always attends
            ch = self.channels * self.channel_mult[i]
            if head_dim is not None and ch % head_dim:
                raise ValueError(f"model.head_dim={head_dim} does not divide the {ch} channels of an attention "
                                 f"block at resolution {resolutions[i]}")
            if head_dim is None and ch % self.num_heads:
                raise ValueError(
                    f"model.num_heads={self.num_heads} does not divide the {ch} channels of an "
                    f"attention block at resolution {resolutions[i]}")
            if groups is not None and i == len(self.channel_mult) - 1 and ch % groups:
                raise ValueError(f"model.attn_norm_num_groups={groups} does not divide the {ch} channels of an "
                                 f"attention block at resolution {resolutions[i]}")
