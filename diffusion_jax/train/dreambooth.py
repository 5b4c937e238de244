"""DreamBooth's data (Ruiz et al. 2023, sec. 3.3; the network is models/dreambooth.py): the subject's images (config
`data`, every one labelled [V]) mixed with class images that the frozen base drew for the subject's class (labelled
with the class), which keep the class's prior while the whole network is fine-tuned.

    source = with_prior(exp, workdir, subject_source)     # train.loop calls it for a model.name="dreambooth" run

The class images are drawn once, with the base run's EMA params, the run's `sample` section (sampler, steps, eta;
no guidance) and key fold_in(seed, CLASS_IMAGES_TAG), and kept in WORKDIR/class_images.npz (class_images.png shows
them), so a resumed run trains on the same ones.

lambda = model.prior_loss_weight is realised by the mix: each epoch holds the subject's n images r times and the
N class images, r = max(1, round(N / (lambda n))), so a batch's mean loss is, in expectation,
(L_subject + lambda' L_prior) / (1 + lambda') with lambda' = N / (r n) (= lambda when r divides evenly), which is the
paper's L_subject + lambda L_prior at a learning rate 1 / (1 + lambda) as large. lambda = 0 trains on the subject
alone (no class images are drawn; an epoch holds the subject about num_class_images times).
"""
from __future__ import annotations

import os
import warnings

import jax
import numpy as np

from diffusion_jax import fileio, viz
from diffusion_jax.config import build_schedule
from diffusion_jax.data.pipeline import check_indices
from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn
from diffusion_jax.train.checkpoint import load_trained

CLASS_IMAGES = "class_images.npz"
CLASS_IMAGES_TAG = 0xDB   # folded into the run's seed for the class images' noise
CHUNK = 256               # class images drawn per sampler call


class PriorSource:
    """The subject's images r times (label [V]) then the class images (label class_label), by index."""

    def __init__(self, subject: np.ndarray, class_images: np.ndarray, identifier: int, class_label: int,
                 repeats: int, num_classes: int):
        self.subject, self.class_images = subject, class_images
        self.identifier, self.class_label, self.repeats = identifier, class_label, repeats
        self.num_subject = repeats * len(subject)
        self.num_examples = self.num_subject + len(class_images)
        self.image_shape = tuple(int(d) for d in subject.shape[1:])
        self.num_classes = num_classes

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = check_indices(indices, self.num_examples)
        is_subject = idx < self.num_subject
        image = np.empty((len(idx), *self.image_shape), np.float32)
        image[is_subject] = self.subject[idx[is_subject] % len(self.subject)]
        image[~is_subject] = self.class_images[idx[~is_subject] - self.num_subject]
        label = np.where(is_subject, self.identifier, self.class_label).astype(np.int32)
        return {"image": image, "label": label}


def subject_repeats(num_subject: int, num_class: int, prior_loss_weight: float) -> int:
    """r of the module doc: how often an epoch holds each subject image. Without the prior (lambda = 0) the epoch
    holds the subject about num_class_images times, as many as the class images would be."""
    lam = prior_loss_weight or 1.0
    return max(1, round(num_class / (lam * num_subject)))


def draw_class_images(exp, *, progress: bool = True) -> np.ndarray:
    """(num_class_images, H, W, C) float32: the base run's samples of model.class_label (module doc)."""
    cfg = exp.model
    base_exp, graphdef, params, _ = load_trained(cfg.base_workdir)
    schedule = build_schedule(base_exp.schedule, params)
    spec = SamplerSpec.from_config(exp.sample)
    shape = (base_exp.model.image_size, base_exp.model.image_size, base_exp.model.in_channels)
    key = jax.random.fold_in(jax.random.PRNGKey(exp.seed), CLASS_IMAGES_TAG)
    chunk = min(CHUNK, cfg.num_class_images)
    sample = make_sample_fn(graphdef, schedule, spec, (chunk, *shape), prediction=base_exp.loss.prediction,
                            learn_sigma=base_exp.model.learn_sigma, num_classes=base_exp.model.num_classes)
    labels = np.full((chunk,), cfg.class_label, np.int32)
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(-(-cfg.num_class_images // chunk)), desc=f"class images of label {cfg.class_label}",
                  disable=not progress):
        out.append(np.asarray(sample(params, jax.random.fold_in(key, i), labels)[0]))
    images = np.concatenate(out)[: cfg.num_class_images].astype(np.float32)
    if not np.isfinite(images).all():
        raise FloatingPointError(f"the base run {cfg.base_workdir!r} drew non-finite class images with "
                                 f"sample.sampler={exp.sample.sampler!r}; choose another sampler")
    return np.clip(images, -1.0, 1.0)


def class_images(exp, workdir: str, *, progress: bool = True) -> np.ndarray:
    """WORKDIR/class_images.npz, drawn and written first when missing; ValueError when it holds other images than
    the config asks for (another class, number or size)."""
    cfg, path = exp.model, os.path.join(workdir, CLASS_IMAGES)
    want = (cfg.num_class_images, cfg.image_size, cfg.image_size, cfg.in_channels)
    if os.path.exists(path):
        with np.load(path) as f:
            images, label = f["images"], int(f["class_label"])
        if images.shape != want or label != cfg.class_label:
            raise ValueError(f"{path} holds {images.shape[0]} class images of label {label} shaped "
                             f"{images.shape[1:]}, but the config asks for {want[0]} of model.class_label="
                             f"{cfg.class_label} shaped {want[1:]}: use a new workdir")
        return images
    images = draw_class_images(exp, progress=progress)
    fileio.atomic_write(path, lambda f: np.savez(f, images=images, class_label=cfg.class_label))
    viz.save_grid(images[:100], os.path.join(workdir, "class_images.png"))
    return images


def with_prior(exp, workdir: str, source, *, write: bool = True, progress: bool = True):
    """The training source of a DreamBooth run (module doc): `source`'s images as the subject, labelled [V], and
    the class images (drawn into WORKDIR when `write`, else read from it)."""
    cfg = exp.model
    if exp.latent.vae_workdir is not None:
        raise ValueError("DreamBooth on a latent diffusion run is not supported by train: the subject's images would "
                         "have to be encoded by the VAE; fine-tune a pixel-space class-conditional run")
    shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
    if tuple(source.image_shape) != shape:
        raise ValueError(f"the subject's images (data '{exp.data.name}') are {tuple(source.image_shape)} but the base "
                         f"run takes {shape} (model.base image_size, in_channels); for a folder of grey images "
                         "set data.grayscale=True")
    subject = source.get(np.arange(source.num_examples))["image"]
    if cfg.prior_loss_weight == 0:
        prior = np.zeros((0, *shape), np.float32)
    elif write:
        prior = class_images(exp, workdir, progress=progress)
    else:
        with np.load(os.path.join(workdir, CLASS_IMAGES)) as f:
            prior = f["images"]
    r = subject_repeats(len(subject), cfg.num_class_images, cfg.prior_loss_weight)
    if len(prior) and abs(len(prior) / (r * len(subject)) - cfg.prior_loss_weight) > 0.1 * cfg.prior_loss_weight:
        warnings.warn(f"model.prior_loss_weight={cfg.prior_loss_weight} is realised as "
                      f"{len(prior) / (r * len(subject)):.3f} ({len(prior)} class images, {len(subject)} subject "
                      f"images x {r}); choose model.num_class_images near a multiple of "
                      f"{cfg.prior_loss_weight * len(subject):g}", RuntimeWarning)
    return PriorSource(subject, prior, cfg.identifier, cfg.class_label, r, cfg.num_classes)
