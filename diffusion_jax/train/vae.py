"""Train the KL autoencoder of latent diffusion (model.name = "vae": `models/vae.py`, loss in `models/vae_loss.py`)
on an image source, as a `runner.TrainJob` of the one host loop (resume, checkpoints, metrics, signals,
non-finite checks and data-parallel sharding are the loop's, as for diffusion).

    run = load_vae_run("configs/vae.py:fashion_mnist")      # or train.runs.load_run: dispatches on model.name
    train_vae(run, workdir)                   # resumes from workdir/checkpoints when there is one
    vae_config, params = load_vae(workdir)    # the config carries the estimated scaling_factor

A workdir holds config.json (the run: sections seed, data, model, loss, optim, train), checkpoints/ (orbax: step,
params, opt_state, key, discriminator), metrics.jsonl, samples/ (held-out originals above their reconstructions at
train.sample_every steps and at the end), and, when training ends: vae.json (the VAEConfig with LDM's latent scale
1 / std(z) estimated on training images), eval.json (PSNR in dB of posterior-mean reconstructions of held-out
images, data range [-1, 1]) and reconstructions.png.

With loss.discriminator set, each step also updates the PatchGAN discriminator (hinge loss) on the same batch
(Esser et al. 2021; LDM's autoencoders), the generator's adversarial term switching on at loss.disc_start.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusion_jax import parallel, viz
from diffusion_jax.config import OptimConfig, apply_overrides, build_section, load_config_file
from diffusion_jax.data import DataConfig, load_source
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
from diffusion_jax.train import runner
from diffusion_jax.train.checkpoint import Checkpointer
from diffusion_jax.train.state import keep_if_finite, make_optimizer


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    """The `train` section of an autoencoder run: the host loop's keys (as in config.TrainConfig) and the
    evaluation written when training ends."""
    steps: int = 2000
    batch_size: int = 64              # global batch, split over devices
    num_devices: int = 0              # 0 = all available
    log_every: int = 100
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    sample_every: int = 0             # reconstructions written to samples/ every N steps (0 = at the end only)
    on_nonfinite: str = "stop"        # a NaN/Inf loss or gradient: "stop" the run, or "skip" the update
    eval_split: str = "test"          # held-out images for the PSNR of eval.json
    eval_num: int = 1000
    scale_num: int = 2048             # training images whose latents give the scaling factor


@dataclasses.dataclass(frozen=True)
class VAELossSection:
    """The `loss` section: `models.vae_loss.VAELossConfig` without the autoencoder (the `model` section)."""
    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    sample_posterior: bool = True
    disc_weight: float = 0.5
    disc_start: int = 0
    discriminator: DiscriminatorConfig | None = None


@dataclasses.dataclass(frozen=True)
class VAERun:
    seed: int
    data: DataConfig
    model: VAEConfig
    loss: VAELossSection
    optim: OptimConfig
    train: VAETrainConfig

    SECTIONS = {"data": DataConfig, "model": VAEConfig, "loss": VAELossSection, "optim": OptimConfig,
                "train": VAETrainConfig}

    @classmethod
    def section_class(cls, name: str, values: Mapping | None = None) -> type:
        return cls.SECTIONS[name]

    @property
    def loss_config(self) -> VAELossConfig:
        return VAELossConfig(vae=self.model, **{f.name: getattr(self.loss, f.name)
                                                for f in dataclasses.fields(VAELossSection)})

    def to_dict(self) -> dict:
        """The config's own layout (sections seed, data, model, loss, optim, train), as config.json holds it."""
        return json_ready({"seed": self.seed, **{k: dataclasses.asdict(getattr(self, k)) for k in self.SECTIONS}})

    @classmethod
    def from_config(cls, config) -> VAERun:
        """ConfigDict / dict with sections seed, data, model (a VAEConfig, name "vae"), loss (reconstruction,
        kl_weight, sample_posterior, disc_weight, disc_start, discriminator: None or a DiscriminatorConfig dict),
        optim, train -> VAERun; every error names its key."""
        raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
        if "vae" in raw and "model" not in raw:   # a run saved before the autoencoder became model.name="vae"
            raw["model"] = dict(raw.pop("vae"), name="vae")
        unknown = set(raw) - set(cls.SECTIONS) - {"seed"}
        if unknown:
            raise ValueError(f"unknown top-level key(s) {sorted(unknown)} in an autoencoder config; expected "
                             f"{['seed', *cls.SECTIONS]}")
        loss = dict(raw.get("loss", {}))
        disc = loss.pop("discriminator", None)
        sections = {name: build_section(name, klass, raw.get(name, {}))
                    for name, klass in cls.SECTIONS.items() if name != "loss"}
        loss = build_section("loss", VAELossSection, loss)
        if disc is not None:
            loss = dataclasses.replace(loss, discriminator=build_section("loss.discriminator", DiscriminatorConfig,
                                                                         disc))
        run = cls(seed=int(raw.get("seed", 0)), loss=loss, **sections)
        run.validate()
        return run

    def validate(self) -> None:
        if self.model.name != "vae":
            raise ValueError(f"model.name={self.model.name!r}: an autoencoder run trains model.name='vae'")
        self.data.validate()
        dataclasses.replace(self.data, split=self.train.eval_split).validate()   # the held-out split, before training
        self.loss_config.validate()
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints", "eval_num", "scale_num"):
            value = getattr(self.train, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"train.{name} must be a positive int, got {value!r}")
        for name in ("num_devices", "sample_every"):
            value = getattr(self.train, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"train.{name} must be an int >= 0, got {value!r}")
        if self.train.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite={self.train.on_nonfinite!r} is unknown; choose from ('stop', 'skip')")
        if self.data.image_size % self.model.downsample_factor:
            raise ValueError(f"data.image_size={self.data.image_size} must divide by the VAE's downsampling factor "
                             f"{self.model.downsample_factor} (2 ** (len(model.block_out_channels) - 1))")


def json_ready(x):
    """Tuples -> lists, recursively (what a JSON round trip gives)."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    return [json_ready(v) for v in x] if isinstance(x, (tuple, list)) else x


def load_vae_run(spec: str, overrides=()) -> VAERun:
    """configs/vae.py[:arg] + overrides ("train.steps=200") -> the validated VAERun."""
    return VAERun.from_config(apply_overrides(load_config_file(spec), overrides, run_class=VAERun))


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
        params = init_vae(run.model, k_vae)
        disc = None if run.loss.discriminator is None else init_discriminator(run.loss.discriminator, k_disc)
        return VAEState(jnp.zeros((), jnp.int32), params, tx.init(params), k_state, disc,
                        None if disc is None else tx.init(disc))
    return init


def make_vae_step(run: VAERun, tx, mesh, state_shardings):
    """Jitted (state, {"image": (B, H, W, C) in [-1, 1]} sharded over `mesh`) -> (state, metrics); state donated."""
    cfg = run.loss_config

    def step(state: VAEState, batch):
        key = jax.random.fold_in(state.key, state.step)
        images = batch["image"]
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
        if run.train.on_nonfinite == "skip":
            new = keep_if_finite(new, state, metrics)
        return new, metrics

    return jax.jit(step, in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,),
                   compiler_options=parallel.step_compiler_options(mesh))


def _held_out(run: VAERun, num: int) -> np.ndarray:
    held = load_source(dataclasses.replace(run.data, split=run.train.eval_split))
    return held.get(np.arange(min(num, held.num_examples)))["image"]


@runner.holds_workdir("train (autoencoder)")
def train_vae(run: VAERun, workdir: str, *, progress: bool = True) -> dict:
    """Train (resuming from WORKDIR's latest checkpoint), then estimate the scaling factor and evaluate.
    Returns eval.json's dict: psnr (held-out, dB), psnr_train, scaling_factor, steps."""
    source = load_source(run.data)
    if source.image_shape[-1] != run.model.in_channels:
        raise ValueError(f"model.in_channels={run.model.in_channels} but data '{run.data.name}' has "
                         f"{source.image_shape[-1]} channel(s)")
    mesh = parallel.make_mesh(run.train.num_devices)
    parallel.check_divisible(run.train.batch_size, mesh, "train.batch_size")
    os.makedirs(workdir, exist_ok=True)
    runner.write_config(workdir, run.to_dict(), {"model": run.model, "loss": run.loss},
                        write=parallel.is_main_process())
    tx, _ = make_optimizer(run.optim, run.train.steps)
    init = _init_fn(run, tx)
    shardings = parallel.state_shardings(mesh, jax.eval_shape(init))
    state = jax.jit(init, out_shardings=shardings)()
    fns = make_vae_fns(run.model)
    held = _held_out(run, max(16, run.train.eval_num))   # read once: the previews' 16 and the evaluation's images
    shown = held[:16]

    def write_reconstructions(state, step: int):
        recon = np.clip(parallel.to_host(fns.decode(state.params, fns.encode(state.params, shown).mode())), -1, 1)
        if parallel.is_main_process():
            viz.save_grid(np.concatenate([shown, recon]), os.path.join(workdir, "samples", f"step_{step:08d}.png"),
                          nrow=len(shown))

    job = runner.TrainJob("train vae", run.to_dict(), run.train, source, run.data, mesh, state,
                          make_vae_step(run, tx, mesh, shardings), preview=write_reconstructions,
                          show=("rec", "psnr"))
    state = runner.run_job(job, workdir, progress=progress)
    return finish_vae(run, workdir, state.params, int(state.step), source, held[:run.train.eval_num])


def finish_vae(run: VAERun, workdir: str, params, steps: int, source, held_images: np.ndarray) -> dict:
    """Scaling factor on training images, PSNR on `held_images` (the first train.eval_num of train.eval_split),
    reconstructions.png; writes vae.json and eval.json."""
    fns = make_vae_fns(run.model)
    n = min(run.train.scale_num, source.num_examples)
    train_images = source.get(np.arange(n))["image"]
    scale = estimate_scaling_factor(fns.encode, params, train_images, key=jax.random.PRNGKey(run.seed + 1))

    def mean_psnr(images):
        values = [psnr(jnp.asarray(images[i:i + 256]), fns.decode(params, fns.encode(params, images[i:i + 256]).mode()))
                  for i in range(0, len(images), 256)]
        return float(np.mean(np.concatenate([np.asarray(v) for v in values])))

    result = {"psnr": mean_psnr(held_images), "psnr_train": mean_psnr(train_images[:len(held_images)]),
              "eval_split": run.train.eval_split, "eval_num": len(held_images), "scaling_factor": scale,
              "steps": steps}
    if not parallel.is_main_process():
        return result
    vae = dataclasses.replace(run.model, scaling_factor=scale)
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
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a finished VAE run (an autoencoder "
                                "run, diffusion-jax train --config configs/vae.py, writes vae.json when training ends)")
    vae = VAEConfig(**read_json(path))
    run = VAERun.from_config(read_json(os.path.join(workdir, "config.json")))
    tx, _ = make_optimizer(run.optim, run.train.steps)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                jax.eval_shape(_init_fn(run, tx)))
        state, _ = ckpt.restore_newest_good(abstract)
    finally:
        ckpt.close()
    return vae, state.params
