"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a locked,
trained U-Net plus a trainable copy of its encoder whose features enter the locked decoder through zero-initialised
1x1 convolutions, so that a small data set teaches a new condition (edges, a low-resolution image, ...) without
harming the original model.

    c_f = E(c)                                       conditioning encoder: control image -> conv_in's width
    h_i = copy_i(x_t + ..., t, y, context; c_f)      the trainable copy: conv_in(x_t) + c_f, then down and mid blocks
    r_i = s_i * Z_i(h_i),  Z_i = 1x1 conv, zero-init the residuals; s_i = conditioning_scale (guess mode:
                                                     conditioning_scale * logspace(-1, 0) over the blocks, diffusers)
    eps = F_locked(x_t, t, y, context; skips + r)    the locked U-Net with r added to its skips and its mid block

At initialisation every Z_i is zero, so r = 0 and the network is the base model exactly (tests/unit/test_controlnet_net.py
checks bit-identical samples). Several ControlNets on one base sum their residuals (diffusers MultiControlNetModel).

The layout follows diffusers' ControlNetModel (conv_in, time_embedding, class_embedding, down_blocks, mid_block,
controlnet_cond_embedding, controlnet_down_blocks, controlnet_mid_block) for a `unet_cond` base, so that
`convert_controlnet` maps a diffusers folder name for name; a `unet` (DDPM / ADM) base gets the same construction on
its own encoder.

Registered as `model.name = "controlnet"` (models/registry.py): `model.base` is the base run's model section (read
from `model.base_workdir`/config.json when left unset), whose EMA params the train loop locks and copies into the
trainable encoder (`pretrained`), and only `controlnets` is trained (`trainable`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.data.conditions import CONDITIONS
from diffusion_jax.models.adapted import BASES, AdaptedConfig, check_base, load_base
from diffusion_jax.models.layers import COMPUTE_DTYPES
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.models.unet_cond_backbone import UNetCondBackboneConfig
from diffusion_jax.models.unet_cond_blocks import conv



@dataclasses.dataclass(frozen=True)
class ControlNetConfig(AdaptedConfig):
    """`model` section of `model.name="controlnet"`; errors name keys as `model.<field>`."""

    name: str = "controlnet"
    base: UNetConfig | UNetCondBackboneConfig | None = None   # the locked U-Net's model section (a dict is read
    #   into its dataclass); None: read from base_workdir/config.json
    base_workdir: str | None = None          # the trained base run whose EMA params are locked and copied
    condition: str | None = "sobel"          # data.conditions name the control images are computed with; None:
    #   given as images only (e.g. a ControlNet imported from diffusers, models/convert_controlnet.py)
    conditioning_channels: int = 1           # channels of the control image
    embedding_channels: tuple[int, ...] = (16,)   # conditioning encoder widths; len - 1 stride-2 convs, so the
    #   control image is image_size * 2**(len - 1) pixels (diffusers: (16, 32, 96, 256) for SD's 8x latents)

    ADAPTER, TUPLES = "a ControlNet", ("embedding_channels",)

    @property
    def control_size(self) -> int:
        """Height and width of the control image: image_size * 2**(len(embedding_channels) - 1)."""
        return self.base.image_size * 2 ** (len(self.embedding_channels) - 1)

    def validate(self) -> None:
        if self.name != "controlnet":
            raise ValueError(f"model.name={self.name!r} does not name this config (controlnet)")
        check_base(self.base, "a ControlNet")
        if self.condition is not None and self.condition not in CONDITIONS:
            raise ValueError(f"model.condition={self.condition!r} is unknown; choose from {sorted(CONDITIONS)}")
        for key in ("conditioning_channels",):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key}={value!r} must be a positive int")
        chans = self.embedding_channels
        if not isinstance(chans, tuple) or not chans or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chans):
            raise ValueError(f"model.embedding_channels={chans!r} must be a non-empty tuple of positive ints")


class ConditioningEmbedding(nnx.Module):
    """diffusers ControlNetConditioningEmbedding: conv_in 3x3 (c -> e_0), SiLU, then for i < n - 1: conv 3x3
    (e_i -> e_i), SiLU, conv 3x3 stride 2 (e_i -> e_{i+1}), SiLU; conv_out 3x3 (e_{n-1} -> out), zero-initialised.
    (B, S, S, c) -> (B, S / 2^(n-1), S / 2^(n-1), out)."""

    def __init__(self, cin: int, widths: tuple[int, ...], cout: int, *, dtype, rngs: nnx.Rngs):
        self.conv_in = conv(cin, widths[0], 3, rngs, dtype)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [conv(a, a, 3, rngs, dtype), conv(a, b, 3, rngs, dtype, stride=2)]
        self.blocks = nnx.List(blocks)
        self.conv_out = conv(widths[-1], cout, 3, rngs, dtype, zero=True)

    def __call__(self, c):
        h = nnx.silu(self.conv_in(c))
        for block in self.blocks:
            h = nnx.silu(block(h))
        return self.conv_out(h)


def guess_mode_scales(num: int):
    """diffusers' guess-mode weights of the num residuals (down ..., mid): logspace(-1, 0, num), 0.1 -> 1."""
    return jnp.logspace(-1.0, 0.0, num)


class ControlNet(nnx.Module):
    """The trainable copy: the base's encoder (`encoder`, built with encoder_only=True and initialised from the
    locked weights), the conditioning encoder and the zero convolutions. Returns the residuals (down, mid)."""

    def __init__(self, config: ControlNetConfig, *, rngs: nnx.Rngs):
        base = config.base
        klass = BASES[base.name][1]
        dt = COMPUTE_DTYPES[base.dtype]
        self.encoder = klass(base, rngs=rngs, encoder_only=True)
        widths = self.encoder.skip_channels
        self.controlnet_cond_embedding = ConditioningEmbedding(config.conditioning_channels, config.embedding_channels,
                                                               widths[0], dtype=dt, rngs=rngs)
        self.controlnet_down_blocks = nnx.List([conv(w, w, 1, rngs, dt, zero=True) for w in widths])
        self.controlnet_mid_block = conv(widths[-1], widths[-1], 1, rngs, dt, zero=True)
        self.control_size = config.control_size
        self.conditioning_channels = config.conditioning_channels

    def __call__(self, x, t, y, context, control, scale, *, guess_mode: bool = False, train: bool = False,
                 dropout_key=None):
        """x, t, y, context: as the base's; control (B, S, S, conditioning_channels) in [0, 1]; scale: scalar
        conditioning_scale. Returns (down residuals, one per skip of the base, mid residual)."""
        control = jnp.asarray(control)
        want = (x.shape[0], self.control_size, self.control_size, self.conditioning_channels)
        if control.shape != want:
            raise ValueError(f"the control image must be {want} (batch, model.control_size, model.control_size, "
                             f"model.conditioning_channels), got {tuple(control.shape)}")
        x, emb, context, key = self.encoder.prepare(x, t, y, context, train=train, dropout_key=dropout_key)
        hint = self.controlnet_cond_embedding(control.astype(x.dtype))
        skips, h = self.encoder.encode(x, emb, context, key, hint=hint)
        down = [z(s) for z, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        scales = jnp.asarray(scale, jnp.float32) * (guess_mode_scales(len(down) + 1) if guess_mode
                                                      else jnp.ones(len(down) + 1))
        down = [(r * scales[i]).astype(r.dtype) for i, r in enumerate(down)]
        return down, (mid * scales[-1]).astype(mid.dtype)


class ControlledUNet(nnx.Module):
    """The registered backbone: the locked base U-Net (`base`) and one or more ControlNets (`controlnets`).

    net(x, t, y=None, context=None, *, control=None, conditioning_scale=1.0, guess_mode=False, train=False,
        dropout_key=None)
      control: None (the base model alone, bit for bit), a (B, S, S, c) control image in [0, 1], or one per
        ControlNet (a tuple); conditioning_scale: a scalar or one per ControlNet (traced: changing it does not
        recompile). The base runs in inference mode (no dropout): it is locked.
    """

    def __init__(self, config: ControlNetConfig, *, rngs: nnx.Rngs, num_controlnets: int = 1,
                 controlnet_configs: tuple[ControlNetConfig, ...] | None = None):
        """config: the first ControlNet's (its base is the locked U-Net); num_controlnets copies of it, or one per
        controlnet_configs (all on config.base, each with its own condition encoder)."""
        config.validate()
        configs = tuple(controlnet_configs) if controlnet_configs is not None else (config,) * num_controlnets
        for i, c in enumerate(configs):
            if c.base != config.base:
                raise ValueError(f"ControlNet {i} was made for another base U-Net than ControlNet 0 ({c.base} vs "
                                 f"{config.base})")
        self.config = config
        self.base = BASES[config.base.name][1](config.base, rngs=rngs)
        self.controlnets = nnx.List([ControlNet(c, rngs=rngs) for c in configs])

    def __call__(self, x, t, y=None, context=None, *, control=None, conditioning_scale=1.0, guess_mode: bool = False,
                 train: bool = False, dropout_key=None):
        if control is None:
            return self.base(x, t, y, context)
        controls = tuple(control) if isinstance(control, (tuple, list)) else (control,)
        n = len(self.controlnets)
        if len(controls) != n:
            raise ValueError(f"{len(controls)} control image(s) for {n} ControlNet(s)")
        scales = jnp.broadcast_to(jnp.asarray(conditioning_scale, jnp.float32), (n,))
        residuals = None
        for i, (net, c) in enumerate(zip(self.controlnets, controls)):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            down, mid = net(x, t, y, context, c, scales[i], guess_mode=guess_mode, train=train, dropout_key=key)
            if residuals is None:
                residuals = (down, mid)
            else:   # several ControlNets: their residuals are summed (diffusers MultiControlNetModel)
                residuals = ([a + b for a, b in zip(residuals[0], down)], residuals[1] + mid)
        return self.base(x, t, y, context, residuals=residuals)


def trainable(path: tuple) -> bool:
    """Whether the param at `path` (a key path of the pure param dict) is trained: the ControlNets, not the base."""
    return bool(path) and path[0] == "controlnets"


def pretrained(config: ControlNetConfig, params: dict, load_params) -> dict:
    """Fresh params with the base locked to `load_params(config.base_workdir)` (the base run's EMA params) and every
    ControlNet's encoder copied from it (Zhang et al. 2023: the trainable copy starts as the locked block)."""
    base = load_base(config.base_workdir, params["base"], load_params)
    out = dict(params, base=base, controlnets=dict(params["controlnets"]))
    for i, net in params["controlnets"].items():
        copied = _copy_subtree(net["encoder"], base)
        out["controlnets"][i] = dict(net, encoder=copied)
    return out


def _copy_subtree(target: dict, source: dict) -> dict:
    """target's structure with source's arrays at the same keys (the encoder is a sub-tree of the full U-Net)."""
    return {k: _copy_subtree(v, source[k]) if isinstance(v, dict) else jnp.array(source[k], copy=True)
            for k, v in target.items()}
