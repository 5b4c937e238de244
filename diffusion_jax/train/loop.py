"""train_and_evaluate(experiment, config, workdir): the training loop around the pure train step.

Host side only: data, progress bar, metrics, checkpoints and sample grids. Resumes from the latest
checkpoint in WORKDIR when there is one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import parallel, viz
from diffusion_jax.config import Experiment
from diffusion_jax.data import Batches, load_source
from diffusion_jax.fileio import write_json
from diffusion_jax.sampling import SamplerSpec, class_labels, make_sample_fn
from diffusion_jax.schedules import make_schedule
from diffusion_jax.train.checkpoint import Checkpointer
from diffusion_jax.train.metrics import MetricWriter
from diffusion_jax.train.state import StepOptions, create_train_state, make_optimizer, make_train_step

# Sections whose change makes an existing checkpoint meaningless (shapes or the meaning of the network).
_FROZEN_SECTIONS = ("model", "schedule", "loss")


def check_data_matches_model(exp: Experiment, source) -> None:
    h, w, c = source.image_shape
    if c != exp.model.in_channels:
        raise ValueError(f"model.in_channels={exp.model.in_channels} but data '{exp.data.name}' has {c} channel(s)")
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
    return [f"{s}.{k}" for s in _FROZEN_SECTIONS for k in new[s]
            if json.loads(json.dumps(new[s][k])) != old.get(s, {}).get(k)]


def write_config(workdir: str, exp: Experiment) -> None:
    """Save the resolved config; refuse to resume a workdir whose model/schedule/loss differ."""
    changed = frozen_changes(workdir, exp)
    if changed:
        raise ValueError(f"{workdir} holds a run with different {', '.join(changed)}; "
                         "use a new --workdir (nothing was changed in the old one)")
    write_json(os.path.join(workdir, "config.json"), exp.to_dict())


def train_and_evaluate(exp: Experiment, workdir: str, *, progress: bool = True):
    """Train for exp.train.steps steps (resuming if WORKDIR has a checkpoint). Returns the final TrainState."""
    tc = exp.train
    source = load_source(exp.data)
    check_data_matches_model(exp, source)
    mesh = parallel.make_mesh(tc.num_devices)
    parallel.check_batch_size(tc.batch_size, mesh)
    os.makedirs(workdir, exist_ok=True)
    write_config(workdir, exp)

    schedule = make_schedule(**dataclasses.asdict(exp.schedule))
    tx, lr_fn = make_optimizer(exp.optim, tc.steps)
    graphdef, state, shardings = create_train_state(exp.model, tx, jax.random.PRNGKey(exp.seed), mesh, tc.fsdp)
    ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
    start = int(state.step)

    opts = StepOptions(tc.ema_decay, tc.ema_warmup, exp.model.learn_sigma, exp.model.num_classes)
    train_step = make_train_step(graphdef, schedule, exp.loss, tx, lr_fn, opts, mesh, shardings)
    shape = (tc.sample_num, *source.image_shape)
    spec = SamplerSpec("ddim", steps=tc.sample_steps)
    sample_fn = make_sample_fn(graphdef, schedule, spec, shape, prediction=exp.loss.prediction,
                               learn_sigma=exp.model.learn_sigma, num_classes=exp.model.num_classes)
    labels = class_labels(tc.sample_num, exp.model.num_classes)

    def write_samples(step: int):
        images, _ = sample_fn(state.ema_params, jax.random.PRNGKey(exp.seed + 1), labels)
        viz.save_grid(np.asarray(images), os.path.join(workdir, "samples", f"step_{step:08d}.png"))

    batches = Batches(source, tc.batch_size, seed=exp.data.seed, random_flip=exp.data.random_flip)
    writer = MetricWriter(workdir)
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, desc="train", unit="step",
               dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), start
    try:
        for step, batch in zip(range(start, tc.steps), batches.iterate(start)):
            state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
            done = step + 1
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.steps:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                metrics["img_per_s"] = (done - step_last) * tc.batch_size / (now - t_last)
                t_last, step_last = now, done
                writer.write(done, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
            if done % tc.ckpt_every == 0 and done != tc.steps:
                ckpt.save(done, state, exp.to_dict())
            if tc.sample_every and done % tc.sample_every == 0 and done != tc.steps:
                write_samples(done)
        if int(state.step) > start or ckpt.latest_step() is None:
            ckpt.save(int(state.step), state, exp.to_dict())
            write_samples(int(state.step))
    finally:
        bar.close()
        writer.close()
        ckpt.wait()
        ckpt.close()
    return state
