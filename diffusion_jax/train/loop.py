"""train_and_evaluate(experiment, workdir): diffusion training, a `runner.TrainJob` of the host loop.

What is diffusion's here: the data checks against the model, the train state (params, EMA, optimizer; a learned
VDM gamma inside the params), the objective's jitted step (`state.make_train_step`) and the sample grids written
during and after training. Resume, checkpoints, metrics, signals and non-finite checks are the shared host loop's
(`runner.run_job`). Resumes from the latest readable checkpoint in WORKDIR when there is one.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import jax
import numpy as np

from diffusion_jax import parallel, viz
from diffusion_jax.config import Experiment, build_schedule, learned_gamma
from diffusion_jax.data import load_source
from diffusion_jax.inference.sampling import SamplerSpec, class_labels, make_sample_fn
from diffusion_jax.train import runner
from diffusion_jax.train.state import StepOptions, create_train_state, make_optimizer, make_train_step

# Sections whose change makes an existing checkpoint meaningless (shapes or the meaning of the network).
_FROZEN_SECTIONS = ("model", "schedule", "loss", "latent")


def check_data_matches_model(exp: Experiment, source) -> None:
    h, w, c = source.image_shape
    what = "the VAE latents of data" if exp.latent.vae_workdir is not None else "data"
    if c != exp.model.in_channels:
        raise ValueError(f"model.in_channels={exp.model.in_channels} but {what} '{exp.data.name}' has {c} channel(s)")
    if exp.latent.vae_workdir is not None:
        if h != exp.model.image_size:
            raise ValueError(f"model.image_size={exp.model.image_size} but the VAE latents of data "
                             f"'{exp.data.name}' are {h}x{w}: set model.image_size={h}")
        if source.context_shape[-1] != exp.model.context_dim:
            raise ValueError(f"model.context_dim={exp.model.context_dim} but latent.text_encoder="
                             f"{exp.latent.text_encoder!r} gives {source.context_shape[-1]}-dim embeddings")
    if exp.model.num_classes is not None and source.num_classes is None:
        raise ValueError(f"model.num_classes={exp.model.num_classes} but data '{exp.data.name}' has no labels")
    if exp.model.num_classes is not None and source.num_classes > exp.model.num_classes:
        raise ValueError(f"model.num_classes={exp.model.num_classes} < {source.num_classes} classes in the data")


def frozen_changes(workdir: str, exp: Experiment) -> list[str]:
    """The model / schedule / loss / latent keys in which `exp` differs from the run saved in WORKDIR ([] if none
    is)."""
    return runner.frozen_changes(workdir, exp.to_dict(), {s: getattr(exp, s) for s in _FROZEN_SECTIONS})


def write_config(workdir: str, exp: Experiment, write: bool = True) -> None:
    """Save the resolved config (if `write`); refuse to resume a workdir whose model/schedule/loss differ."""
    runner.write_config(workdir, exp.to_dict(), {s: getattr(exp, s) for s in _FROZEN_SECTIONS}, write)


def train_and_evaluate(exp: Experiment, workdir: str, *, progress: bool = True):
    """Train for exp.train.steps steps (resuming if WORKDIR has a checkpoint). Returns the final TrainState.

    Raises train.faults.Preempted after saving a checkpoint when SIGTERM / SIGINT arrives, and
    NonFiniteError on a NaN / Inf loss or gradient (train.on_nonfinite); checkpoints already saved are kept.
    In a multi-process run (parallel.initialize_distributed) every process calls this with the same arguments;
    process 0 writes the config, metrics, progress bar and sample grids.
    """
    tc = exp.train
    main = parallel.is_main_process()
    source = load_source(exp.data)
    if exp.latent.vae_workdir is None:
        check_data_matches_model(exp, source)
    mesh = parallel.make_mesh(tc.num_devices)
    parallel.check_divisible(tc.batch_size, mesh, "train.batch_size")
    parallel.check_divisible(tc.sample_num, mesh, "train.sample_num")
    os.makedirs(workdir, exist_ok=True)
    write_config(workdir, exp, write=main)
    if exp.latent.vae_workdir is not None:   # latent diffusion: the VAE's latents of the data, with captions
        from diffusion_jax.train.latent import build_latent_source

        if not main:   # process 0 encodes the dataset and writes the cache; the others then read it
            parallel.sync("latent cache")
        source = build_latent_source(exp, workdir, source, progress=progress and main)
        if main:
            parallel.sync("latent cache")
        check_data_matches_model(exp, source)

    tx, lr_fn = make_optimizer(exp.optim, tc.steps)
    gamma = learned_gamma(exp.schedule)   # a learned VDM gamma is trained with (and inside) the params
    graphdef, state, shardings = create_train_state(exp.model, tx, jax.random.PRNGKey(exp.seed), mesh, tc.fsdp,
                                                    learned_gamma=gamma)
    opts = StepOptions(tc.ema_decay, tc.ema_warmup, exp.model.learn_sigma, exp.model.num_classes,
                       skip_nonfinite=tc.on_nonfinite == "skip")
    schedule = build_schedule(exp.schedule, state.params)
    train_step = make_train_step(graphdef, schedule, exp.loss, tx, lr_fn, opts, mesh, shardings)
    shape = (tc.sample_num, *source.image_shape)
    if exp.schedule.kind == "discrete":
        grid_spec = SamplerSpec("ddim", steps=tc.sample_steps)
    else:   # the run's own sampler and spacing (DDIM's timesteps are discrete)
        grid_spec = SamplerSpec.from_config(dataclasses.replace(exp.sample, steps=tc.sample_steps))

    def grid_sampler(schedule):
        return make_sample_fn(graphdef, schedule, grid_spec, shape, prediction=exp.loss.prediction,
                              learn_sigma=exp.model.learn_sigma, num_classes=exp.model.num_classes, mesh=mesh)

    # `schedule` of a learned gamma holds state.params' gamma, which the step donates: only the loss reads it (its
    # spec, not its arrays); the grids rebuild it from the EMA
    sample_fn = grid_sampler(schedule) if gamma is None else None
    labels = class_labels(tc.sample_num, exp.model.num_classes)
    if exp.latent.vae_workdir is not None:   # decoded images of the text-conditioned model, a caption per class
        from diffusion_jax.train.latent import latent_grid_fn

        sample_fn = latent_grid_fn(exp, graphdef, schedule, grid_spec, source, mesh)

    def write_samples(state, step: int):
        # a learned gamma changes as it trains: sample with the EMA's (which costs a compile per grid)
        sample = sample_fn if gamma is None else grid_sampler(build_schedule(exp.schedule, state.ema_params))
        images = parallel.to_host(sample(state.ema_params, jax.random.PRNGKey(exp.seed + 1), labels)[0])
        if not main:
            return
        if not np.isfinite(images).all():   # finite params can still diverge while sampling: say so, go on
            warnings.warn(f"the sample grid at step {step} has non-finite pixels; not written", RuntimeWarning)
            return
        viz.save_grid(images, os.path.join(workdir, "samples", f"step_{step:08d}.png"))

    job = runner.TrainJob("train", exp.to_dict(), tc, source, exp.data, mesh, state, train_step,
                          preview=write_samples, show=("loss", "img_per_s"))
    return runner.run_job(job, workdir, progress=progress)
