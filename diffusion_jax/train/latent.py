"""Text-to-image from the project's own latent diffusion runs (config section `latent`: an autoencoder run's workdir
and MiniLM captions), as the same `TextToImage` that Stable Diffusion folders load into.

    model = load_latent_run("workdirs/ldm_fmnist")      # or load_text_to_image(...), which dispatches here
    images, nfe = generate(model, ["a photo of a sandal"], SamplerSpec("dpmpp_2m", 20, clip_denoised=None,
                                                                        guidance_scale=3.0))
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from diffusion_jax.config import sampling_kwargs
from diffusion_jax.inference.pipelines import stable_diffusion
from diffusion_jax.inference.pipelines.latent import LatentPipeline, make_pipeline
from diffusion_jax.inference.pipelines.stable_diffusion import TextToImage
from diffusion_jax.train.latent_data import build_latent_source, text_encoder

__all__ = ["build_latent_source", "latent_grid_fn", "load_latent_run", "load_text_to_image"]


def load_text_to_image(folder: str) -> TextToImage:
    """A latent diffusion run of this project (config.json, `load_latent_run`), or what
    `stable_diffusion.load_text_to_image` takes: a converted folder (pipeline.json) or a diffusers one."""
    if os.path.isfile(os.path.join(folder, "config.json")) and not any(
            os.path.isfile(os.path.join(folder, f)) for f in ("pipeline.json", "model_index.json")):
        return load_latent_run(folder)
    return stable_diffusion.load_text_to_image(folder)


def pipeline_kwargs(exp) -> dict:
    """LatentPipeline's keywords of a trained latent run: prediction, consistency, guidance_input."""
    kw = sampling_kwargs(exp)
    return {k: kw[k] for k in ("prediction", "consistency", "guidance_input")}


def latent_grid_fn(exp, graphdef, schedule, spec, source, mesh=None):
    """sample(ema_params, key, labels=None) -> (decoded images (train.sample_num, H, W, C), NFE): the training
    loop's sample grid of a latent run, image i drawn for class i % num_classes's first caption, no guidance."""
    from diffusion_jax.train.vae import load_vae

    vae, vae_params = load_vae(exp.latent.vae_workdir)
    pipe = LatentPipeline(graphdef, vae, schedule, **pipeline_kwargs(exp))
    num = exp.train.sample_num
    size = source.image_shape[0] * vae.downsample_factor
    run = make_pipeline(pipe, dataclasses.replace(spec, clip_denoised=None, guidance_scale=1.0), "txt2img",
                        num=num, image_size=(size, size), mesh=mesh)
    context = source.contexts[np.arange(num) % source.num_classes]

    def sample(ema_params, key, labels=None):
        return run({"unet": ema_params, "vae": vae_params}, key, context)

    return sample


def load_latent_run(workdir: str, step: int | None = None) -> TextToImage:
    """The EMA U-Net of a text-conditioned latent run with its VAE and text encoder -> TextToImage."""
    from diffusion_jax.config import build_schedule
    from diffusion_jax.train.checkpoint import load_trained
    from diffusion_jax.train.vae import load_vae

    exp, graphdef, ema, step = load_trained(workdir, step, allow_latent=True)
    if exp.latent.vae_workdir is None:
        raise ValueError(f"{workdir!r} is a pixel-space run: sample it with diffusion-jax sample --workdir {workdir}")
    if not os.path.isdir(exp.latent.vae_workdir):
        raise FileNotFoundError(f"the run's latent.vae_workdir={exp.latent.vae_workdir!r} does not exist (from the "
                                f"current directory {os.getcwd()!r})")
    vae, vae_params = load_vae(exp.latent.vae_workdir)
    pipe = LatentPipeline(graphdef, vae, build_schedule(exp.schedule, ema), **pipeline_kwargs(exp))
    encode, _ = text_encoder(exp.latent)
    size = exp.model.image_size * vae.downsample_factor
    return TextToImage(pipe, {"unet": ema, "vae": vae_params}, encode, (size, size),
                       {"experiment": exp.to_dict(), "vae": vae, "step": step})
