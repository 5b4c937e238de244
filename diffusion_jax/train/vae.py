"""Train the KL autoencoder of latent diffusion (`models/vae.py`, loss in `models/vae_loss.py`) on an image source.

    run, _ = load_vae_run_config("configs/vae.py:fashion_mnist")
    train_vae(run, workdir)                   # resumes from workdir/checkpoints when there is one
    vae_config, params = load_vae(workdir)    # the config carries the estimated scaling_factor

A workdir holds config.json (the run), checkpoints/ (orbax: step, params, opt_state, key, discriminator),
metrics.jsonl, and, when training ends: vae.json (the VAEConfig with LDM's latent scale 1 / std(z) estimated on
training images), eval.json (PSNR in dB of posterior-mean reconstructions of held-out images, data range
[-1, 1]) and reconstructions.png (held-out originals above their reconstructions).

With loss.discriminator set, each step also updates the PatchGAN discriminator (hinge loss) on the same batch
(Esser et al. 2021; LDM's autoencoders), the generator's adversarial term switching on at loss.disc_start.
"""
from __future__ import annotations

import dataclasses
import os

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from diffusion_jax import viz
from diffusion_jax.config import OptimConfig, apply_overrides, build_section, load_config_file
from diffusion_jax.data import Batches, DataConfig, load_source
from diffusion_jax.fileio import read_json, write_json
from diffusion_jax.models.vae import VAEConfig, init_vae, make_vae_fns
from diffusion_jax.models.vae_loss import (
    DiscriminatorConfig,
    VAELossConfig,
    discriminator_loss,
    estimate_scaling_factor,
    init_discriminator,
    psnr,
    vae_loss,
)
from diffusion_jax.train.checkpoint import Checkpointer
from diffusion_jax.train.metrics import MetricWriter, truncate_metrics
from diffusion_jax.train.state import make_optimizer


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 2000
    batch_size: int = 64
    log_every: int = 100
    ckpt_every: int = 1000
    eval_split: str = "test"          # held-out images for the PSNR of eval.json
    eval_num: int = 1000
    scale_num: int = 2048             # training images whose latents give the scaling factor


@dataclasses.dataclass(frozen=True)
class VAERun:
    seed: int
    data: DataConfig
    loss: VAELossConfig               # holds the VAEConfig (loss.vae) and the optional discriminator
    optim: OptimConfig
    train: VAETrainConfig

    def to_dict(self) -> dict:
        """The config's own layout (sections seed, data, vae, loss, optim, train), as config.json holds it."""
        loss = {f.name: getattr(self.loss, f.name) for f in dataclasses.fields(_LossKeys)}
        disc = self.loss.discriminator
        loss["discriminator"] = None if disc is None else dataclasses.asdict(disc)
        return json_ready({"seed": self.seed, "data": dataclasses.asdict(self.data),
                           "vae": dataclasses.asdict(self.loss.vae), "loss": loss,
                           "optim": dataclasses.asdict(self.optim), "train": dataclasses.asdict(self.train)})


def json_ready(x):
    """Tuples -> lists, recursively (what a JSON round trip gives)."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    return [json_ready(v) for v in x] if isinstance(x, (tuple, list)) else x


def vae_run_from_config(config) -> VAERun:
    """ConfigDict / dict with sections seed, data, vae, loss (reconstruction, kl_weight, sample_posterior,
    disc_weight, disc_start, discriminator: None or a DiscriminatorConfig dict), optim, train -> VAERun."""
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = set(raw) - {"seed", "data", "vae", "loss", "optim", "train"}
    if unknown:
        raise ValueError(f"unknown top-level key(s) {sorted(unknown)} in a VAE config; expected seed, data, vae, "
                         "loss, optim, train")
    if "vae" in raw.get("loss", {}):
        raise ValueError("give the autoencoder in the 'vae' section, not as loss.vae")
    loss = dict(raw.get("loss", {}))
    disc = loss.pop("discriminator", None)
    vae = build_section("vae", VAEConfig, raw.get("vae", {}))
    run = VAERun(seed=int(raw.get("seed", 0)), data=build_section("data", DataConfig, raw.get("data", {})),
                 loss=VAELossConfig(vae=vae, discriminator=None if disc is None else build_section(
                     "loss.discriminator", DiscriminatorConfig, disc), **build_section("loss", _LossKeys, loss).kw),
                 optim=build_section("optim", OptimConfig, raw.get("optim", {})),
                 train=build_section("train", VAETrainConfig, raw.get("train", {})))
    run.data.validate()
    dataclasses.replace(run.data, split=run.train.eval_split).validate()   # the held-out split, before training
    run.loss.validate()
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "eval_num", "scale_num"):
        value = getattr(run.train, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"train.{name} must be a positive int, got {value!r}")
    if run.data.image_size % vae.downsample_factor:
        raise ValueError(f"data.image_size={run.data.image_size} must divide by the VAE's downsampling factor "
                         f"{vae.downsample_factor} (2 ** (len(vae.block_out_channels) - 1))")
    return run


@dataclasses.dataclass(frozen=True)
class _LossKeys:
    """The loss section's scalar keys (the VAE and discriminator configs are separate sections)."""
    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    sample_posterior: bool = True
    disc_weight: float = 0.5
    disc_start: int = 0

    @property
    def kw(self) -> dict:
        return dataclasses.asdict(self)


def load_vae_run_config(spec: str, overrides=()) -> VAERun:
    return vae_run_from_config(apply_overrides(load_config_file(spec), overrides))


@flax.struct.dataclass
class VAEState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    key: jax.Array
    disc_params: dict | None
    disc_opt_state: optax.OptState | None


def _init_fn(run: VAERun, tx):
    def init():
        k_vae, k_disc, k_state = jax.random.split(jax.random.PRNGKey(run.seed), 3)
        params = init_vae(run.loss.vae, k_vae)
        disc = None if run.loss.discriminator is None else init_discriminator(run.loss.discriminator, k_disc)
        return VAEState(jnp.zeros((), jnp.int32), params, tx.init(params), k_state, disc,
                        None if disc is None else tx.init(disc))
    return init


def make_vae_step(run: VAERun, tx):
    """Jitted (state, images (B, H, W, C) in [-1, 1]) -> (state, metrics); state donated."""
    cfg = run.loss

    def step(state: VAEState, images):
        key = jax.random.fold_in(state.key, state.step)
        (_, aux), grads = jax.value_and_grad(vae_loss, has_aux=True)(
            state.params, images, key, cfg, step=state.step, disc_params=state.disc_params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = dict(aux.metrics, grad_norm=optax.tree.norm(grads))
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
        if cfg.discriminator is not None:
            (_, d_metrics), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
                state.disc_params, images, aux.reconstruction, cfg, step=state.step)
            d_updates, d_opt = tx.update(d_grads, state.disc_opt_state, state.disc_params)
            new = new.replace(disc_params=optax.apply_updates(state.disc_params, d_updates), disc_opt_state=d_opt)
            metrics.update(d_metrics)
        return new, metrics

    return jax.jit(step, donate_argnums=(0,))


def train_vae(run: VAERun, workdir: str, *, progress: bool = True) -> dict:
    """Train (resuming from WORKDIR's latest checkpoint), then estimate the scaling factor and evaluate.
    Returns eval.json's dict: psnr (held-out, dB), psnr_train, scaling_factor, steps."""
    source = load_source(run.data)
    if source.image_shape[-1] != run.loss.vae.in_channels:
        raise ValueError(f"vae.in_channels={run.loss.vae.in_channels} but data '{run.data.name}' has "
                         f"{source.image_shape[-1]} channel(s)")
    os.makedirs(workdir, exist_ok=True)
    saved = os.path.join(workdir, "config.json")
    if os.path.exists(saved) and read_json(saved).get("vae") != run.to_dict()["vae"]:
        raise ValueError(f"{workdir} holds a VAE run with a different 'vae' section; use a new --workdir "
                         "(nothing was changed in the old one)")
    write_json(saved, run.to_dict())
    tx, _ = make_optimizer(run.optim, run.train.steps)
    init = _init_fn(run, tx)
    ckpt = Checkpointer(workdir, keep=2, async_save=False)
    try:
        state, start = ckpt.restore_latest(jax.eval_shape(init))
        state = jax.jit(init)() if state is None else state
        start = int(state.step)
        truncate_metrics(workdir, start)   # rows past the checkpoint are logged again by this run
        step_fn = make_vae_step(run, tx)
        batches = Batches(source, run.train.batch_size, seed=run.data.seed, random_flip=run.data.random_flip)
        writer = MetricWriter(workdir, tensorboard=False)
        bar = tqdm(total=run.train.steps, initial=start, disable=not progress, desc="train-vae", unit="step")
        try:
            for step, batch in zip(range(start, run.train.steps), batches.iterate(start)):
                state, metrics = step_fn(state, jnp.asarray(batch["image"]))
                done = step + 1
                bar.update(1)
                if done % run.train.log_every == 0 or done == run.train.steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not np.isfinite(metrics["loss"]):
                        raise FloatingPointError(f"VAE loss is {metrics['loss']} at step {done}; the last "
                                                 f"checkpoint in {ckpt.directory} is kept")
                    writer.write(done, metrics)
                    bar.set_postfix(rec=f"{metrics['rec']:.2f}", psnr=f"{metrics['psnr']:.1f}")
                if done % run.train.ckpt_every == 0 or done == run.train.steps:
                    ckpt.save(done, state, run.to_dict())
        finally:
            bar.close()
            writer.close()
    finally:
        ckpt.close()
    return finish_vae(run, workdir, state.params, int(state.step), source)


def finish_vae(run: VAERun, workdir: str, params, steps: int, source) -> dict:
    """Scaling factor on training images, held-out PSNR, reconstructions.png; writes vae.json and eval.json."""
    fns = make_vae_fns(run.loss.vae)
    n = min(run.train.scale_num, source.num_examples)
    train_images = source.get(np.arange(n))["image"]
    scale = estimate_scaling_factor(fns.encode, params, train_images, key=jax.random.PRNGKey(run.seed + 1))
    held = load_source(dataclasses.replace(run.data, split=run.train.eval_split))
    held_images = held.get(np.arange(min(run.train.eval_num, held.num_examples)))["image"]

    def mean_psnr(images):
        values = [psnr(jnp.asarray(images[i:i + 256]), fns.decode(params, fns.encode(params, images[i:i + 256]).mode()))
                  for i in range(0, len(images), 256)]
        return float(np.mean(np.concatenate([np.asarray(v) for v in values])))

    result = {"psnr": mean_psnr(held_images), "psnr_train": mean_psnr(train_images[:len(held_images)]),
              "eval_split": run.train.eval_split, "eval_num": len(held_images), "scaling_factor": scale,
              "steps": steps}
    vae = dataclasses.replace(run.loss.vae, scaling_factor=scale)
    write_json(os.path.join(workdir, "vae.json"), json_ready(dataclasses.asdict(vae)))
    write_json(os.path.join(workdir, "eval.json"), result)
    show = held_images[:16]
    recon = np.asarray(fns.decode(params, fns.encode(params, show).mode()))
    viz.save_grid(np.concatenate([show, np.clip(recon, -1, 1)]), os.path.join(workdir, "reconstructions.png"),
                  nrow=len(show))
    return result


def load_vae(workdir: str) -> tuple[VAEConfig, dict]:
    """(VAEConfig with its scaling_factor, params) of a finished `train_vae` workdir."""
    path = os.path.join(workdir, "vae.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a finished VAE run (diffusion-jax "
                                "train-vae writes vae.json when training ends)")
    vae = VAEConfig(**read_json(path))
    run = vae_run_from_config(read_json(os.path.join(workdir, "config.json")))
    tx, _ = make_optimizer(run.optim, run.train.steps)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                jax.eval_shape(_init_fn(run, tx)))
        state = ckpt.restore(abstract)
    finally:
        ckpt.close()
    return vae, state.params
