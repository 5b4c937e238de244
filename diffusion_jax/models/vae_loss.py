"""Training the KL autoencoder: LDM's loss without LPIPS, an optional PatchGAN, the latent scale factor.

References:
  Rombach et al. 2022 (LDM), `ldm/modules/losses/contperceptual.py` `LPIPSWithDiscriminator`:
      L = sum_pixels rec(x, x_hat) / B + kl_weight * sum_latent KL(q(z|x) || N(0, I)) / B
          + d_weight * disc_factor(step) * (-mean D(x_hat))
    Choices made here, and why:
      * no LPIPS term (it needs pretrained VGG weights no package ships; perceptual_weight = 0);
      * LDM's learnable scalar log-variance of the reconstruction NLL is fixed at 0 (its initial value),
        so the NLL is the plain reconstruction error;
      * both terms are *sums over each example's pixels / latent elements, averaged over the batch*, as
        LDM does, so kl_weight keeps LDM's meaning (1e-6 for the kl-f8 autoencoder);
      * `rec` is |x - x_hat| (l1, LDM's) or (x - x_hat)^2 (l2);
      * the adversarial weight is the fixed `disc_weight`; LDM rescales it by the adaptive ratio
        ||grad_last rec|| / ||grad_last g_loss|| of Esser et al. 2021 (VQGAN), which is not implemented:
        with pixel *sums*, a useful fixed disc_weight is larger than LDM's 0.5.
  Isola et al. 2017 (pix2pix) PatchGAN / taming-transformers `NLayerDiscriminator`: 4x4 convs, stride 2,
    LeakyReLU(0.2), N(0, 0.02) init; GroupNorm replaces BatchNorm so the module holds only Params (used
    functionally, no batch statistics). Hinge loss (Lim & Ye 2017; Miyato et al. 2018) as in LDM.
  LDM Sec. 4.3.2 / `DDPM.on_train_batch_start`: scale_factor = 1 / std of the encoder's latent samples
    on a data batch (`estimate_scaling_factor`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.functional import split_params
from diffusion_jax.models.layers import GROUPNORM_EPS
from diffusion_jax.models.vae import VAEConfig, vae_graphdef

RECONSTRUCTIONS = ("l1", "l2")


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio per image, (B,) in dB, of images in [-1, 1] (data range 2)."""
    mse = jnp.mean((jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)) ** 2, axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10(data_range**2 / mse)


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 3
    channels: int = 64          # ndf; layer n has channels * min(2**n, 8)
    num_layers: int = 3         # stride-2 convs (taming n_layers); receptive field 70 px for 3
    norm_num_groups: int = 32

    def widths(self) -> list[int]:
        return [self.channels * min(2**n, 8) for n in range(self.num_layers + 1)]

    def validate(self) -> None:
        for name in ("in_channels", "channels", "num_layers", "norm_num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"discriminator.{name}={value!r} must be a positive int")
        for w in self.widths()[1:]:
            if w % self.norm_num_groups:
                raise ValueError(f"discriminator width {w} is not divisible by "
                                 f"discriminator.norm_num_groups={self.norm_num_groups}")


class PatchDiscriminator(nnx.Module):
    """(B, H, W, C) images -> (B, h, w, 1) real / fake logits of overlapping patches."""

    def __init__(self, config: DiscriminatorConfig, *, rngs: nnx.Rngs):
        config.validate()
        init = nnx.initializers.normal(0.02)
        conv = lambda i, o, s: nnx.Conv(i, o, (4, 4), strides=s, padding=((1, 1), (1, 1)),
                                        kernel_init=init, rngs=rngs)
        widths = config.widths()
        self.conv_in = conv(config.in_channels, widths[0], 2)
        strides = [2] * (config.num_layers - 1) + [1]
        self.convs = nnx.List([conv(widths[n], widths[n + 1], s) for n, s in enumerate(strides)])
        self.norms = nnx.List([nnx.GroupNorm(w, num_groups=config.norm_num_groups, epsilon=GROUPNORM_EPS, rngs=rngs)
                               for w in widths[1:]])
        self.conv_out = conv(widths[-1], 1, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.leaky_relu(self.conv_in(x), 0.2)
        for conv, norm in zip(self.convs, self.norms):
            h = nnx.leaky_relu(norm(conv(h)), 0.2)
        return self.conv_out(h)


@functools.lru_cache(maxsize=32)
def discriminator_graphdef(config: DiscriminatorConfig):
    return nnx.split(nnx.eval_shape(lambda: PatchDiscriminator(config, rngs=nnx.Rngs(0))), nnx.Param)[0]


def init_discriminator(config: DiscriminatorConfig, key: jax.Array) -> dict:
    return split_params(PatchDiscriminator(config, rngs=nnx.Rngs(key)))[1]


def apply_discriminator(disc_params, x: jax.Array, config: DiscriminatorConfig) -> jax.Array:
    return nnx.merge(discriminator_graphdef(config), disc_params)(x)


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    vae: VAEConfig
    reconstruction: str = "l1"          # l1 | l2, summed over pixels, mean over the batch
    kl_weight: float = 1e-6             # LDM kl-f8
    sample_posterior: bool = True       # decode z ~ q(z|x) (LDM) or the posterior mean
    discriminator: DiscriminatorConfig | None = None
    disc_weight: float = 0.5            # fixed adversarial weight (see the module docstring)
    disc_start: int = 0                 # adversarial terms are off for step < disc_start

    def validate(self) -> None:
        self.vae.validate()
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"loss.reconstruction={self.reconstruction!r} must be one of {list(RECONSTRUCTIONS)}")
        for name in ("kl_weight", "disc_weight"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"loss.{name}={getattr(self, name)!r} must be a float >= 0")
        if self.discriminator is not None:
            self.discriminator.validate()
            if self.discriminator.in_channels != self.vae.out_channels:
                raise ValueError(f"loss.discriminator.in_channels={self.discriminator.in_channels} != "
                                 f"model.out_channels={self.vae.out_channels}")


class VAELossAux(NamedTuple):
    metrics: dict               # scalars: loss, rec, kl, psnr (+ g_loss, disc_factor with a discriminator)
    reconstruction: jax.Array   # x_hat, e.g. the fakes of the discriminator step (stop its gradient there)


def _images(batch) -> jax.Array:
    return batch["image"] if isinstance(batch, Mapping) else batch


def _disc_factor(step, cfg: VAELossConfig) -> jax.Array:
    return jnp.where(jnp.asarray(step) >= cfg.disc_start, 1.0, 0.0)


def vae_loss(params, batch, key: jax.Array | None, cfg: VAELossConfig, *, step=0,
             disc_params=None) -> tuple[jax.Array, VAELossAux]:
    """The autoencoder's loss (module docstring) and aux; pure and jittable with `cfg` static.

    batch: {"image": (B, H, W, C) in [-1, 1]} or the image array. key: the posterior sample's noise
    (unused when not cfg.sample_posterior). disc_params: needed when cfg.discriminator is set.
    """
    cfg.validate()
    if cfg.discriminator is not None and disc_params is None:
        raise ValueError("loss.discriminator is set: vae_loss needs disc_params")
    x = _images(batch)
    vae = nnx.merge(vae_graphdef(cfg.vae), params)
    post = vae.encode(x)
    x_hat = vae.decode(post.sample(key) if cfg.sample_posterior else post.mode())
    err = jnp.abs(x - x_hat) if cfg.reconstruction == "l1" else (x - x_hat) ** 2
    rec = jnp.mean(jnp.sum(err, axis=(1, 2, 3)))
    kl = jnp.mean(post.kl())
    loss = rec + cfg.kl_weight * kl
    metrics = {"rec": rec, "kl": kl, "psnr": jnp.mean(psnr(x, jax.lax.stop_gradient(x_hat)))}
    if cfg.discriminator is not None:
        g_loss = -jnp.mean(apply_discriminator(disc_params, x_hat, cfg.discriminator))
        factor = _disc_factor(step, cfg)
        loss = loss + cfg.disc_weight * factor * g_loss
        metrics.update(g_loss=g_loss, disc_factor=factor)
    metrics["loss"] = loss
    return loss, VAELossAux(metrics, x_hat)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def discriminator_loss(disc_params, real: jax.Array, fake: jax.Array, cfg: VAELossConfig, *,
                       step=0) -> tuple[jax.Array, dict]:
    """Hinge loss of the PatchGAN on real images and (gradient-stopped) reconstructions; 0 before disc_start."""
    if cfg.discriminator is None:
        raise ValueError("loss.discriminator is None: there is no discriminator to train")
    logits_real = apply_discriminator(disc_params, real, cfg.discriminator)
    logits_fake = apply_discriminator(disc_params, jax.lax.stop_gradient(fake), cfg.discriminator)
    loss = _disc_factor(step, cfg) * hinge_d_loss(logits_real, logits_fake)
    return loss, {"d_loss": loss, "logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake)}


def estimate_scaling_factor(encode_fn: Callable, params, images, key: jax.Array | None = None,
                            batch_size: int = 64, return_shift: bool = False):
    """LDM's latent scale: 1 / std of the latents of `images` (all elements pooled, float64).

    encode_fn(params, x) -> (mean, logvar) (e.g. `make_vae_fns(cfg).encode`). With `key`, latents are
    posterior samples (LDM's recipe); without, the posterior means. return_shift=True also returns
    their mean, the `shift_factor` of (z - shift) * scale (SD3 / FLUX style): (scale, shift).
    """
    images = np.asarray(images)
    zs = []
    for i in range(0, len(images), batch_size):
        mean, logvar = encode_fn(params, jnp.asarray(images[i:i + batch_size]))
        if key is not None:
            noise = jax.random.normal(jax.random.fold_in(key, i), mean.shape, mean.dtype)
            mean = mean + jnp.exp(0.5 * logvar) * noise
        zs.append(np.asarray(mean, np.float64).ravel())
    z = np.concatenate(zs)
    scale = float(1.0 / z.std())
    return (scale, float(z.mean())) if return_shift else scale
