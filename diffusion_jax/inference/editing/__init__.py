"""Controllable generation with an unconditional (or class-conditional) model and any sampler: inpainting and
outpainting with a mask, colorization, SDEdit image-to-image.

    known.py       `Known`: values y and a mask (1 = known), in pixel space or an orthogonal colour space
    levels.py      the (alpha, sigma) a sampler means by the network time t, for every schedule / sampler
    projection.py  score_sde's projection method around any registered sampler (Song et al. 2021, app. I)
    repaint.py     RePaint's resampling on the DDPM / DDIM step (Lugmayr et al. 2022)
    color.py       score_sde's decoupled colorization (gray channel in an orthogonal colour basis)
    sdedit.py      SDEdit (Meng et al. 2022): noise to strength, sample from there
    masks.py       mask helpers (center, border = outpainting, half, random)
    files.py       images and masks from PNG files (never resized)
    api.py         `edit(graphdef, params, schedule, spec, task, image, ...)`: one call for the command line
"""
from diffusion_jax.inference.editing.api import METHODS, TASKS, default_mask, edit, edit_fn
from diffusion_jax.inference.editing.color import gray, gray_known, gray_transform
from diffusion_jax.inference.editing.files import load_image, load_mask
from diffusion_jax.inference.editing.known import Known, known
from diffusion_jax.inference.editing.levels import noise_level
from diffusion_jax.inference.editing.masks import border_hole, center_hole, half_hole, random_hole
from diffusion_jax.inference.editing.projection import conditioned, sample_known
from diffusion_jax.inference.editing.repaint import repaint, repaint_levels, repaint_nfe
from diffusion_jax.inference.editing.sdedit import img2img, truncate_schedule

__all__ = ["METHODS", "TASKS", "Known", "border_hole", "center_hole", "conditioned", "default_mask", "edit", "edit_fn", "gray",
           "gray_known", "gray_transform", "half_hole", "img2img", "known", "load_image", "load_mask", "noise_level",
           "random_hole", "repaint", "repaint_levels", "repaint_nfe", "sample_known", "truncate_schedule"]
