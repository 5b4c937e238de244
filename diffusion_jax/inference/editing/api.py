"""One call per edit, for the command line: a trained model (graphdef, params), a schedule, a `SamplerSpec`, a task
and an image -> edited images (N, H, W, C) in [-1, 1].

    images, nfe = edit(graphdef, params, schedule, spec, "inpaint", image, image_shape=(16, 16, 1), mask=mask)

tasks         inpaint   the mask's holes (0) are generated, its 1s kept (default mask: `masks.center_hole`)
              outpaint  the same with a border hole (default mask: `masks.border_hole`, width min(H, W) // 4)
              colorize  the image's gray (channel mean) is kept, the colour generated (score_sde app. I.3)
              img2img   SDEdit at `strength` in (0, 1] (`sdedit.py`)
methods       projection (any sampler: `projection.py`) or repaint (its own DDPM / DDIM loop: `repaint.py`;
              sampler 'ddpm' with variance fixed_small = eta 1, or 'ddim' with its eta) for inpaint / outpaint /
              colorize. noise: "fresh" | "fixed" (projection only).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import validate
from diffusion_jax.inference.editing.color import gray_known
from diffusion_jax.inference.editing.known import known
from diffusion_jax.inference.editing.masks import border_hole, center_hole
from diffusion_jax.inference.editing.projection import check_noise, sample_known
from diffusion_jax.inference.editing.repaint import repaint
from diffusion_jax.inference.editing.sdedit import check_strength, img2img
from diffusion_jax.inference.sampling import SamplerSpec, check_model_fits, network_denoise_fn
from diffusion_jax.models.functional import make_apply_fn
from diffusion_jax.samplers.wrapper import guide

TASKS = ("inpaint", "outpaint", "colorize", "img2img")
METHODS = ("projection", "repaint")


def repaint_eta(spec: SamplerSpec) -> float:
    """eta of RePaint's step for spec's sampler: 1 for 'ddpm' (fixed_small), the option for 'ddim'."""
    options = dict(spec.options)
    if spec.sampler == "ddpm":
        if options.get("variance", "fixed_small") != "fixed_small" or set(options) - {"variance"}:
            raise ValueError(f"method='repaint' with sampler 'ddpm' takes variance='fixed_small' only, got {options}")
        return 1.0
    if spec.sampler == "ddim" and not set(options) - {"eta"}:
        return float(options.get("eta", 0.0))
    raise ValueError(f"method='repaint' runs its own DDPM / DDIM loop: use sampler 'ddpm' or 'ddim' (with eta), "
                     f"got {spec.sampler!r} with options {options}")


def default_mask(task: str, size) -> np.ndarray:
    """The mask used when none is given: `center_hole` for inpaint, a border of min(H, W) // 4 for outpaint."""
    h, w = (size, size) if isinstance(size, int) else size
    return center_hole((h, w)) if task == "inpaint" else border_hole((h, w), max(1, min(h, w) // 4))


def check_edit(task: str, method: str, image, mask, strength, *, image_shape, num_samples: int, noise: str,
               sampler: str):
    """Validate the inputs of one edit; returns (image (1 or N, H, W, C_in) float32, mask (1 or N, H, W, 1) or
    None). Errors name the argument and the expected form."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; choose from {TASKS}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose from {METHODS}")
    if task == "img2img" and method != "projection":
        raise ValueError("method='repaint' is for inpaint / outpaint / colorize, not img2img")
    if method == "projection":
        check_noise(noise, sampler)
    num = validate.check_int(num_samples, "num_samples")
    h, w, c = validate.check_shape(image_shape, "image_shape")
    if task == "colorize" and c < 2:
        raise ValueError(f"task 'colorize' needs a model of >= 2 (colour) channels; this one has {c}")
    image = validate.as_array(image, "image", "(H, W, C) or (N, H, W, C)")
    if image.ndim == 3:
        image = image[None]
    channels = (1, c) if task == "colorize" else c
    image = validate.check_images(image, "image", channels=channels, size=(h, w))
    if image.shape[0] not in (1, num):
        raise ValueError(f"image holds {image.shape[0]} images; give 1 (shared) or num_samples={num}")
    if task == "img2img":
        check_strength(strength)
    elif strength is not None:
        raise ValueError(f"strength is for task 'img2img' only, got strength={strength!r} with task {task!r}")
    if task in ("colorize", "img2img"):
        if mask is not None:
            raise ValueError(f"task {task!r} takes no mask")
        image = jnp.asarray(image, jnp.float32)
        if task == "colorize" and image.shape[-1] == 1:     # a gray image: as C equal channels (same gray)
            image = jnp.repeat(image, c, axis=-1)
        return image, None
    if mask is None:
        mask = default_mask(task, (h, w))
    mask = validate.check_mask(mask, "mask", size=(h, w), num=num)
    return jnp.asarray(image, jnp.float32), jnp.asarray(mask)


def edit_fn(denoise_fn, schedule, spec: SamplerSpec, task: str, image, mask, key, *, strength=None,
            prediction: str = "eps", method: str = "projection", jump_length: int = 10, resamplings: int = 10,
            noise: str = "fresh", num_samples: int = 1):
    """The edit as a pure (jittable) function of a network denoise_fn(x, t) -> prediction; inputs as `check_edit`
    returns them. Returns (x (N, H, W, C) unclipped, nfe)."""
    options = dict(spec.options)
    clip = spec.clip_denoised or None
    if task == "img2img":
        image = jnp.broadcast_to(image, (num_samples,) + image.shape[1:])
        x, info = img2img(spec.sampler, denoise_fn, schedule, key, image, strength=strength, steps=spec.steps,
                          spacing=spec.spacing, prediction=prediction, clip_denoised=clip, options=options)
        return x, info["nfe"]
    if task == "colorize":
        kn = gray_known(image, channels=image.shape[-1], num=num_samples)
    else:
        kn = known(image, mask, num=num_samples)
    if method == "repaint":
        x, info = repaint(denoise_fn, schedule, key, kn, steps=spec.steps, jump_length=jump_length,
                          resamplings=resamplings, eta=repaint_eta(spec), prediction=prediction,
                          spacing=spec.spacing, clip_denoised=clip)
    else:
        x, info = sample_known(spec.sampler, denoise_fn, schedule, key, kn, steps=spec.steps, prediction=prediction,
                               noise=noise, spacing=spec.spacing, clip_denoised=clip, options=options)
    return x, info["nfe"]


def edit(graphdef, params, schedule, spec: SamplerSpec, task: str, image, *, image_shape: tuple[int, int, int],
         mask=None, strength: float | None = None, seed: int = 0, num_samples: int = 1, prediction: str = "eps",
         learn_sigma: bool = False, num_classes: int | None = None, labels=None, method: str = "projection",
         jump_length: int = 10, resamplings: int = 10, noise: str = "fresh", control: dict | None = None,
         guess_mode: bool = False) -> tuple[np.ndarray, int]:
    """Edit `image` with the model (graphdef, params) as `sampling.make_sample_fn` runs it; compiled end to end.

    image: (H, W, C) or (1 | num_samples, H, W, C) float in [-1, 1] with (H, W, C) = image_shape, the model's
      (colorize: C or 1 channel); `load_image` reads a PNG so. mask: (H, W[, 1]) or (1 | N, H, W, 1) of {0, 1},
      1 = known (inpaint / outpaint only; `load_mask`, `masks`). strength: img2img only, in (0, 1].
    labels: (N,) class labels of a class-conditional model (num_classes); None = the null class (unconditional,
      as the model was trained with label dropout). spec.guidance_scale != 1 guides towards `labels`.
    control: a ControlNet's {"control": (num_samples, S, S, k) images (a tuple, one per ControlNet),
      "conditioning_scale": ...} for a `models.controlnet.ControlledUNet` (as `sampling.make_sample_fn` takes it;
      guess_mode: only the guided branch is controlled).
    Returns (images (num_samples, H, W, C) float32 numpy clipped to [-1, 1], NFE). The known pixels are kept
    exactly (they lie in [-1, 1]); colorize keeps the gray exactly up to float32 rounding of the colour transform,
    except where clipping a colour to [-1, 1] moves it.
    """
    spec.validate()
    image, mask = check_edit(task, method, image, mask, strength, image_shape=image_shape, num_samples=num_samples,
                             noise=noise, sampler=spec.sampler)
    check_model_fits(spec, learn_sigma, num_classes)
    if num_classes is None:
        if labels is not None:
            raise ValueError("labels need a class-conditional model (num_classes); this one is unconditional")
    elif labels is None:
        labels = np.full((num_samples,), num_classes, np.int32)
    else:
        labels = validate.check_labels(labels, "labels", num=num_samples, num_classes=num_classes)
    apply = make_apply_fn(graphdef)
    keep_variance = dict(spec.options).get("variance") == "learned"

    def run(params, key, image, mask, labels, control):
        if control is not None:
            control = dict(control, guess_mode=guess_mode)

        def net(label, control=control):
            return network_denoise_fn(apply, params, label, channels=image_shape[-1], keep_variance=keep_variance,
                                      schedule=schedule, control=control)

        fn = net(labels)
        if spec.guidance_scale != 1.0:
            null = net(jnp.full((num_samples,), num_classes, jnp.int32), None if guess_mode else control)
            fn = lambda x, t: guide(net(labels)(x, t), null(x, t), spec.guidance_scale, spec.guidance_rescale)
        return edit_fn(fn, schedule, spec, task, image, mask, key, strength=strength, prediction=prediction,
                       method=method, jump_length=jump_length, resamplings=resamplings, noise=noise,
                       num_samples=num_samples)

    x, nfe = jax.jit(run)(params, jax.random.PRNGKey(seed), image, mask, labels, control)
    return np.clip(np.asarray(x, np.float32), -1.0, 1.0), int(nfe)
