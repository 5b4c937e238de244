"""Latent diffusion pipelines (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"): text-to-image, image-to-image, inpainting and outpainting with a KL autoencoder, a cross-attention
U-Net and classifier-free guidance, compiled end to end; any sampler of the zoo runs them.

    pipe = LatentPipeline(unet_graphdef, vae_config, schedule, prediction="eps")
    run = make_pipeline(pipe, SamplerSpec("dpmpp_2m", 20, clip_denoised=None, guidance_scale=5.0),
                        "txt2img", num=4, image_size=(64, 64))
    images, nfe = run(params, key, context, null_context)     # params = {"unet": ..., "vae": ...}

tasks
  txt2img   z_T ~ N(0, I) -> sampler on the U-Net -> x = D(z_0).
  img2img   SDEdit in latent space (editing/sdedit.py): z = E(image) (posterior mean), noised to t_0 = strength
            and denoised from there. strength 0 returns D(E(image)) with no network call (the VAE's error only).
  inpaint / outpaint
            projection in latent space (editing/projection.py). A latent cell is known when every pixel of its
            f x f patch is known (mask 1); the decoded image then takes the known pixels from the input exactly
            (the overlay diffusers' inpainting pipeline applies), so the unmasked region is kept bit for bit.
Guidance: pred = pred_uncond + w (pred_cond - pred_uncond) (Ho & Salimans 2022) with the unconditional branch on
`null_context` (the empty prompt's embedding, as Stable Diffusion was trained with caption dropout);
spec.guidance_scale = w, 1 = off. Latents are not bounded, so spec.clip_denoised must be None.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parallel, validate
from diffusion_jax.inference.editing.api import default_mask
from diffusion_jax.inference.editing.known import known
from diffusion_jax.inference.editing.projection import sample_known
from diffusion_jax.inference.editing.sdedit import check_strength, img2img
from diffusion_jax.inference.sampling import SamplerSpec, guidance_of, network_denoise_fn, run_spec
from diffusion_jax.models.functional import make_apply_fn
from diffusion_jax.models.vae import VAEConfig, decode, encode, from_diffusion_latents, to_diffusion_latents

TASKS = ("txt2img", "img2img", "inpaint", "outpaint")


@dataclasses.dataclass(frozen=True, eq=False)
class LatentPipeline:
    """What a latent text-to-image model is made of, apart from its params.

    unet_graphdef: the graphdef of a cross-attention U-Net (`models.UNetCond`; `unet_cond_graphdef(config)`),
      called as apply(params, z, t, context=...) with z (N, h, w, latent_channels).
    vae: the autoencoder's config (its scaling / shift factors map VAE latents to the U-Net's space).
    schedule: the U-Net's noise schedule (a DiscreteSchedule, e.g. Stable Diffusion's scaled_linear, or a
      continuous one from `process/sde.py`); prediction: what the U-Net predicts ("eps", "v", "x0", "edm", ...).
    consistency: a latent consistency model's `objectives.distill.ConsistencyParam` (config.consistency_of), whose
      x0-hat is its consistency function (txt2img only); None for a diffusion model.
    guidance_input: the U-Net takes the guidance weight w as input (a guidance-distilled student, LCM's
      time_cond_proj_dim): the spec's guidance_scale goes to it and each step calls it once, without null_context.
    """

    unet_graphdef: Any
    vae: VAEConfig
    schedule: Any
    prediction: str = "eps"
    consistency: Any = None
    guidance_input: bool = False

    def latent_shape(self, num: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(num, H / f, W / f, latent_channels) for images of image_size (H, W); both must divide by f."""
        f = self.vae.downsample_factor
        h, w = image_size
        if h % f or w % f:
            raise ValueError(f"image_size {tuple(image_size)} must divide by the VAE's downsampling factor {f}")
        return (num, h // f, w // f, self.vae.latent_channels)


def latent_mask(mask: jax.Array, factor: int) -> jax.Array:
    """(N, H, W, 1) pixel mask of {0, 1} (1 = known) -> (N, H/f, W/f, 1): a latent cell is known iff its whole
    f x f patch is known (the min over the patch)."""
    n, h, w, c = mask.shape
    return mask.reshape(n, h // factor, factor, w // factor, factor, c).min(axis=(2, 4))


def check_context(context, name: str, num: int, length: int | None = None, dim: int | None = None) -> jax.Array:
    """context: (1 or num, L, D) float embeddings -> (num, L, D) float32. Errors name the argument and shape."""
    context = validate.as_array(context, name, "(N, L, D) text embeddings")
    if context.ndim != 3 or context.shape[0] not in (1, num):
        raise ValueError(f"{name} must be (1 or {num}, L, D) embeddings, got shape {tuple(context.shape)}")
    if length is not None and (context.shape[1], context.shape[2]) != (length, dim):
        raise ValueError(f"{name} has shape {tuple(context.shape)}; the prompt embeddings are (N, {length}, {dim})")
    validate.check_finite(context, name, "(N, L, D) text embeddings")
    return jnp.broadcast_to(jnp.asarray(context, jnp.float32), (num,) + tuple(context.shape[1:]))


def make_pipeline(pipe: LatentPipeline, spec: SamplerSpec, task: str = "txt2img", *, num: int,
                  image_size: tuple[int, int], strength: float | None = None, mesh=None,
                  compiler_options: dict | None = None, guess_mode: bool = False):
    """Returns run(params, key, context, null_context=None, image=None, mask=None, latents=None, control=None) ->
    (images (num, H, W, C) float32 numpy in [-1, 1], NFE), compiled end to end (module doc for the tasks).

    params: {"unet": U-Net params, "vae": VAE params}. context: (1 | num, L, D) prompt embeddings;
    null_context: the empty prompt's (1 | num, L, D), needed iff spec.guidance_scale != 1.
    image: (1 | num, H, W, C) in [-1, 1] (img2img, inpaint, outpaint); mask: (H, W[, 1]) or (1 | num, H, W, 1)
    of {0, 1}, 1 = keep (inpaint / outpaint; default `editing.api.default_mask`: a centre hole, or a border of
    min(H, W) // 4). strength: img2img only, in [0, 1]. latents: txt2img's initial noise z_T
    (num, H / f, W / f, c) (default: drawn from key), e.g. to reproduce another implementation's run; with
    spec.scheduler_config the standard-normal latents that the scheduler scales by init_noise_sigma (diffusers').
    mesh: split the num images over its "data" axis; the noise is drawn for the whole batch, so a seed gives
    the same images on 1 or 8 devices. compiler_options: passed to `jax.jit` (`models.vae.make_vae_fns`).
    control: for a U-Net with ControlNets (`models.controlnet.ControlledUNet`, `stable_diffusion.with_controlnets`):
    {"control": (num, H, W, k) control images in [0, 1] at the pixel size (a tuple, one per ControlNet),
    "conditioning_scale": scalar or one per ControlNet}, given to both branches of guidance (guess_mode: to the
    prompted branch only, diffusers' guess mode).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; choose from {TASKS}")
    spec.validate()
    if spec.clip_denoised is not None:
        raise ValueError(f"clip_denoised={spec.clip_denoised} clips to [-1, 1], but latents are not bounded; "
                         "give clip_denoised=None for a latent pipeline")
    if pipe.consistency is not None and task != "txt2img":
        raise ValueError(f"task={task!r}: a latent consistency model generates from noise (txt2img) here; the "
                         "editing tasks run diffusion samplers on partly known latents")
    if task == "img2img":
        if strength is None or strength != 0:
            strength = check_strength(strength)
    elif strength is not None:
        raise ValueError(f"strength is for task 'img2img' only, got strength={strength!r} with task {task!r}")
    num = validate.check_int(num, "num")
    imported = spec.imported(pipe.schedule, pipe.prediction)
    if imported is not None and task != "txt2img":
        raise ValueError(f"a diffusers scheduler config (scheduler_config) samples task 'txt2img' only, got {task!r}")
    shape = pipe.latent_shape(num, image_size)
    factor = pipe.vae.downsample_factor
    guidance, w = guidance_of(spec, pipe.guidance_input)
    sharding = None
    if mesh is not None:
        parallel.check_divisible(num, mesh, "the number of images", hint="fewer devices")
        sharding = parallel.batch_sharding(mesh)
    apply = make_apply_fn(pipe.unet_graphdef)
    run_options = dict(prediction=pipe.prediction, spacing=spec.spacing, clip_denoised=None,
                       options=dict(spec.options), guidance=guidance if guidance.active else None)

    def generate(params, key, context, null_context, image, mask, latents, control):
        if control is not None:
            control = dict(control, guess_mode=guess_mode)

        def net(ctx, control=control):
            return network_denoise_fn(apply, params["unet"], None, channels=shape[-1], sharding=sharding,
                                      schedule=pipe.schedule, context=ctx, control=control, w=w)

        uncond = net(null_context, None if guess_mode else control) if guidance.active else None
        nfe = jnp.zeros((), jnp.int32)
        if task == "txt2img":
            z, info = run_spec(spec, imported, net(context), pipe.schedule, key, shape, prediction=pipe.prediction,
                               guidance=guidance, uncond_fn=uncond, x_T=latents, consistency=pipe.consistency)
            nfe = info["nfe"]
        else:
            z0 = to_diffusion_latents(encode(params["vae"], image, pipe.vae).mode(), pipe.vae)
            z0 = jnp.broadcast_to(z0, shape)
            if task == "img2img" and strength == 0:
                z = z0
            elif task == "img2img":
                z, info = img2img(spec.sampler, net(context), pipe.schedule, key, z0, strength=strength,
                                  steps=spec.steps, uncond_fn=uncond, **run_options)
                nfe = info["nfe"]
            else:
                kn = known(z0, latent_mask(mask, factor), num=num)
                z, info = sample_known(spec.sampler, net(context), pipe.schedule, key, kn, steps=spec.steps,
                                       uncond_fn=uncond, **run_options)
                nfe = info["nfe"]
        x = jnp.clip(decode(params["vae"], from_diffusion_latents(z, pipe.vae), pipe.vae), -1.0, 1.0)
        if mask is not None:
            x = jnp.where(mask > 0, image, x)
        return x, nfe

    if sharding is None:
        jitted = jax.jit(generate, compiler_options=compiler_options)
    else:
        jitted = jax.jit(generate, out_shardings=(sharding, parallel.replicated(mesh)),
                         compiler_options=compiler_options)

    def run(params, key, context, null_context=None, image=None, mask=None, latents=None, control=None):
        context = check_context(context, "context", num)
        if latents is not None:
            if task != "txt2img":
                raise ValueError(f"latents (the initial noise z_T) are for task 'txt2img', not {task!r}")
            latents = validate.as_array(latents, "latents", f"{shape} initial noise z_T")
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must be the initial noise z_T of shape {shape}, got "
                                 f"{tuple(latents.shape)}")
            latents = jnp.asarray(latents, jnp.float32)
        if guidance.active:
            if null_context is None:
                raise ValueError(f"guidance_scale={spec.guidance_scale} needs null_context (the empty prompt's "
                                 "embeddings)")
            null_context = check_context(null_context, "null_context", num, *context.shape[1:])
        else:
            null_context = None
        image, mask = _check_image_and_mask(task, image, mask, num, image_size, pipe.vae.in_channels)
        if sharding is not None:
            params = jax.device_put(params, parallel.replicated(mesh))
            context, null_context, image, mask, latents = jax.device_put(
                (context, null_context, image, mask, latents), sharding)
            if control is not None:
                control = dict(control, control=jax.device_put(control["control"], sharding))
        x, nfe = jitted(params, key, context, null_context, image, mask, latents, control)
        return np.asarray(x, np.float32), int(nfe)

    return run


def _check_image_and_mask(task: str, image, mask, num: int, image_size, channels: int):
    """(image (num, H, W, C) float32 or None, mask (num, H, W, 1) float32 or None), checked for `task`."""
    if task == "txt2img":
        if image is not None or mask is not None:
            raise ValueError("task 'txt2img' takes no image or mask; use 'img2img', 'inpaint' or 'outpaint'")
        return None, None
    if image is None:
        raise ValueError(f"task {task!r} needs an image (1 or {num}, H, W, C) in [-1, 1]")
    image = validate.as_array(image, "image", "(H, W, C) or (N, H, W, C)")
    image = validate.check_images(image[None] if image.ndim == 3 else image, "image", channels=channels,
                                  size=tuple(image_size))
    if image.shape[0] not in (1, num):
        raise ValueError(f"image holds {image.shape[0]} images; give 1 (shared) or num={num}")
    image = jnp.broadcast_to(jnp.asarray(image, jnp.float32), (num,) + tuple(image.shape[1:]))
    if task == "img2img":
        if mask is not None:
            raise ValueError("task 'img2img' takes no mask")
        return image, None
    if mask is None:
        mask = default_mask(task, tuple(image_size))
    mask = validate.check_mask(mask, "mask", size=tuple(image_size), num=num)
    return image, jnp.broadcast_to(jnp.asarray(mask, jnp.float32), (num,) + tuple(image.shape[1:3]) + (1,))
