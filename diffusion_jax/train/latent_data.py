"""The training data of a text-conditioned latent diffusion run (config section `latent`): every image of the
pixel source encoded once by the VAE, captions from class names, cached in WORKDIR/latents.npz.

Latents: the posterior mean of E(x), scaled to the diffusion model's space ((z - shift) * scaling_factor;
LDM trains on posterior samples, the mean keeps a cache deterministic; the posterior std of a KL-1e-6 VAE is
small against the latents' spread). Captions: K = len(latent.captions) * num_classes strings, caption
k * num_classes + y being template k filled with class y's name; each image gets one template, drawn once
from data.seed. The text encoder's hidden states of every caption (K, L, D) and of "" (the null caption of
classifier-free guidance) are stored with them. The cache is rebuilt when its fingerprint (the VAE's
checkpoint, the data and latent sections) differs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax.data.latents import LatentSource
from diffusion_jax.fileio import atomic_write

CACHE = "latents.npz"
_CAPTION_TAG = 0xCA9


def text_encoder(latent_cfg) -> tuple[Callable[[list[str]], np.ndarray], int]:
    """(encode(prompts) -> (N, L, D) float32 hidden states, D) of latent.text_encoder at latent.max_length."""
    if latent_cfg.text_encoder != "minilm":
        raise ValueError(f"latent.text_encoder={latent_cfg.text_encoder!r} is unknown; 'minilm' is built in")
    from diffusion_jax.models.text.minilm import encode_text

    def encode(prompts):
        return np.asarray(encode_text(list(prompts), latent_cfg.max_length)[0], np.float32)

    return encode, 384


def _fingerprint(exp, vae_dir: str) -> str:
    ckpt_dir = os.path.join(vae_dir, "checkpoints")
    steps = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    vae_json = os.path.join(vae_dir, "vae.json")
    return json.dumps({"vae": os.path.abspath(vae_dir), "steps": steps,
                       "vae_json": open(vae_json).read() if os.path.isfile(vae_json) else None,
                       "data": {k: str(v) for k, v in dataclasses.asdict(exp.data).items()},
                       "latent": dataclasses.asdict(exp.latent)}, sort_keys=True)


def build_latent_source(exp, workdir: str, pixels, *, progress: bool = True) -> LatentSource:
    """The LatentSource of `pixels` (a labelled image source with class_names) for experiment `exp`."""
    from diffusion_jax.models.vae import make_vae_fns
    from diffusion_jax.train.vae import load_vae

    if pixels.num_classes is None or getattr(pixels, "class_names", None) is None:
        raise ValueError(f"data '{exp.data.name}' has no class names: latent runs caption images by class")
    vae_dir = exp.latent.vae_workdir
    if not os.path.isdir(vae_dir):
        raise FileNotFoundError(f"latent.vae_workdir={vae_dir!r} does not exist (train one: diffusion-jax train --config configs/vae.py)")
    fingerprint = _fingerprint(exp, vae_dir)
    path = os.path.join(workdir, CACHE)
    if os.path.isfile(path):
        with np.load(path) as f:
            if str(f["fingerprint"]) == fingerprint:
                return _source(dict(f), pixels.class_names)
    vae, params = load_vae(vae_dir)
    if vae.in_channels != pixels.image_shape[-1]:
        raise ValueError(f"the VAE in {vae_dir} takes {vae.in_channels} channel(s); data '{exp.data.name}' has "
                         f"{pixels.image_shape[-1]}")
    fns = make_vae_fns(vae)
    chunks, labels = [], []
    n = pixels.num_examples
    for i in tqdm(range(0, n, 256), desc="encode latents", disable=not progress):
        batch = pixels.get(np.arange(i, min(i + 256, n)))
        chunks.append(np.asarray(fns.encode_latents(params, jnp.asarray(batch["image"])), np.float32))
        labels.append(batch["label"])
    names = list(pixels.class_names)
    captions = [t.format(name) for t in exp.latent.captions for name in names]
    encode, _ = text_encoder(exp.latent)
    templates = np.random.default_rng([exp.data.seed, _CAPTION_TAG]).integers(len(exp.latent.captions), size=n)
    labels = np.concatenate(labels).astype(np.int32)
    arrays = {"latents": np.concatenate(chunks), "labels": labels,
              "caption_ids": templates * len(names) + labels, "contexts": encode(captions),
              "null_context": encode([""])[0], "captions": np.asarray(captions), "fingerprint": np.asarray(fingerprint)}
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return _source(arrays, names)


def _source(arrays: dict, class_names) -> LatentSource:
    return LatentSource(arrays["latents"], arrays["labels"], arrays["caption_ids"], arrays["contexts"],
                        arrays["null_context"], [str(c) for c in arrays["captions"]], class_names)
