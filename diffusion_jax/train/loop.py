"""train_and_evaluate(experiment, config, workdir): the training loop around the pure train step.

Host side only: data, progress bar, metrics, checkpoints and sample grids. Resumes from the latest
readable checkpoint in WORKDIR when there is one; the data order and the step's randomness are functions of
(seed, step), so a resumed run ends bit-identical to an uninterrupted one (tests/e2e/test_reliability.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings

import jax
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import parallel, viz
from diffusion_jax.config import Experiment, build_schedule, learned_gamma
from diffusion_jax.data import Batches, load_source
from diffusion_jax.fileio import write_json
from diffusion_jax.inference.sampling import SamplerSpec, class_labels, make_sample_fn
from diffusion_jax.train.checkpoint import Checkpointer
from diffusion_jax.train.faults import NonFiniteGuard, Preempted, SignalCatcher
from diffusion_jax.train.metrics import MetricWriter, truncate_metrics
from diffusion_jax.train.state import StepOptions, create_train_state, make_optimizer, make_train_step

log = logging.getLogger(__name__)

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
    """The model / schedule / loss keys in which `exp` differs from the run saved in WORKDIR ([] if none is)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    new = exp.to_dict()
    changed = []
    for s in _FROZEN_SECTIONS:
        # A key that a run saved by an older version lacks had that version's behaviour: the field's default.
        defaults = json.loads(json.dumps(dataclasses.asdict(type(getattr(exp, s))())))
        for k in new[s]:
            if json.loads(json.dumps(new[s][k])) != old.get(s, {}).get(k, defaults[k]):
                changed.append(f"{s}.{k}")
    return changed


def write_config(workdir: str, exp: Experiment, write: bool = True) -> None:
    """Save the resolved config (if `write`); refuse to resume a workdir whose model/schedule/loss differ."""
    changed = frozen_changes(workdir, exp)
    if changed:
        raise ValueError(f"{workdir} holds a run with different {', '.join(changed)}; "
                         "use a new --workdir (nothing was changed in the old one)")
    if write:
        write_json(os.path.join(workdir, "config.json"), exp.to_dict())


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
    ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    restored, restored_step = ckpt.restore_latest(state)
    if restored is not None:
        state = restored
        log.info("resuming from %s (step %d)", ckpt.step_path(restored_step), restored_step)
    start = int(state.step)
    if main:
        truncate_metrics(workdir, start)   # rows past the checkpoint are re-logged by this run

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

    def write_samples(step: int):
        # a learned gamma changes as it trains: sample with the EMA's (which costs a compile per grid)
        sample = sample_fn if gamma is None else grid_sampler(build_schedule(exp.schedule, state.ema_params))
        images = parallel.to_host(sample(state.ema_params, jax.random.PRNGKey(exp.seed + 1), labels)[0])
        if not main:
            return
        if not np.isfinite(images).all():   # finite params can still diverge while sampling: say so, go on
            warnings.warn(f"the sample grid at step {step} has non-finite pixels; not written", RuntimeWarning)
            return
        viz.save_grid(images, os.path.join(workdir, "samples", f"step_{step:08d}.png"))

    def last_checkpoint():
        ckpt.wait()
        step = ckpt.latest_step()
        return None if step is None else ckpt.step_path(step)

    batches = Batches(source, tc.batch_size, seed=exp.data.seed, random_flip=exp.data.random_flip)
    guard = NonFiniteGuard(tc.on_nonfinite, last_checkpoint)
    writer = MetricWriter(workdir) if main else None
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and main), desc="train", unit="step",
               dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), start
    pending = None   # (step, metrics) not yet checked: checked one step late, so the device stays busy
    try:
        with SignalCatcher() as signals:
            for step, batch in zip(range(start, tc.steps), batches.iterate(start)):
                state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
                done = step + 1
                bar.update(1)
                if pending is not None:
                    guard.check(*pending)
                pending = (done, metrics)
                if (done % tc.log_every == 0 or done == tc.steps or done % tc.ckpt_every == 0
                        or signals.received):      # the state is about to be read or saved: check it now
                    metrics = jax.device_get(metrics)
                    guard.check(done, metrics)
                    pending = None
                if done % tc.log_every == 0 or done == tc.steps:
                    now = time.perf_counter()
                    metrics["img_per_s"] = (done - step_last) * tc.batch_size / (now - t_last)
                    if tc.on_nonfinite == "skip":
                        metrics["skipped_updates"] = guard.skipped
                    t_last, step_last = now, done
                    if writer is not None:
                        writer.write(done, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
                if signals.received and done != tc.steps:
                    ckpt.save(done, state, exp.to_dict())
                    ckpt.wait()
                    raise Preempted(signals.received, done, ckpt.step_path(done))
                if done % tc.ckpt_every == 0 and done != tc.steps:
                    ckpt.save(done, state, exp.to_dict())
                if tc.sample_every and done % tc.sample_every == 0 and done != tc.steps:
                    write_samples(done)
            if int(state.step) > start or ckpt.latest_step() is None:
                ckpt.save(int(state.step), state, exp.to_dict())
                write_samples(int(state.step))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        ckpt.wait()
        ckpt.close()
    return state
