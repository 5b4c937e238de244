"""The host loop that every training method shares: data order, resume, metrics, checkpoints, preemption and
non-finite checks. A method (diffusion in `loop.py`, the autoencoder in `vae.py`) hands it a `TrainJob`: its
jitted step, its initial state and what to write; this loop never asks which method it runs.

    state = run_job(job, workdir, progress=True)

Resumes from the latest readable checkpoint in WORKDIR when there is one; the data order and each step's
randomness are functions of (seed, step), so a resumed run ends bit-identical to an uninterrupted one
(tests/e2e/test_reliability.py). In a multi-process run every process calls this with the same job; process 0
writes the metrics, progress bar and images.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
from tqdm.auto import tqdm

from diffusion_jax import parallel
from diffusion_jax.data import Batches
from diffusion_jax.fileio import WorkdirLock, write_json
from diffusion_jax.train.checkpoint import Checkpointer
from diffusion_jax.train.faults import NonFiniteGuard, Preempted, SignalCatcher
from diffusion_jax.train.metrics import MetricWriter, truncate_metrics

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainJob:
    """One training run, as the host loop sees it.

    loop: the run's `train` section; the loop reads steps, batch_size, log_every, ckpt_every, keep_checkpoints,
      async_checkpointing, sample_every and on_nonfinite ("skip": `step` itself keeps the old state on a
      non-finite loss or gradient, see `state.keep_if_finite`).
    state: the initial state, already in its shardings (the restore target); state.step counts updates.
    step: jitted (state, batch sharded over `mesh`) -> (state, metrics with "loss" and "grad_norm").
    preview: (state, step) -> None, called at every loop.sample_every steps and at the end (every process
      calls it; it writes on process 0 only).
    """

    name: str                                 # progress-bar label
    config: dict                              # the resolved run (config.json), saved with every checkpoint
    loop: Any
    source: Any                               # the training images (data.sources)
    data: Any                                 # DataConfig: seed and random_flip of the batch order
    mesh: jax.sharding.Mesh
    state: Any
    step: Callable
    preview: Callable[[Any, int], None] | None = None
    show: tuple[str, ...] = ("loss",)         # metrics on the progress bar


def holds_workdir(command: str):
    """Decorator: fn(run, workdir, ...) runs holding `fileio.WorkdirLock` on `workdir` (process 0 holds it for a
    multi-process run), so a second writer is refused with the holder's PID instead of interleaving its checkpoints
    and metrics."""
    def decorate(fn):
        @functools.wraps(fn)
        def locked(run, workdir, *args, **kwargs):
            if not parallel.is_main_process():
                return fn(run, workdir, *args, **kwargs)
            with WorkdirLock(workdir, command):
                return fn(run, workdir, *args, **kwargs)
        return locked
    return decorate


def frozen_changes(workdir: str, config: Mapping, sections: Mapping[str, Any]) -> list[str]:
    """The keys of `sections` (name -> the run's dataclass for it) in which `config` (the run's dict) differs from
    the run saved in WORKDIR/config.json ([] if there is none)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    new = json.loads(json.dumps(dict(config)))
    changed = []
    for s, section in sections.items():
        # A key that a run saved by an older version lacks had that version's behaviour: the field's default.
        defaults = json.loads(json.dumps(dataclasses.asdict(type(section)())))
        for k in new[s]:
            if new[s][k] != old.get(s, {}).get(k, defaults[k]):
                changed.append(f"{s}.{k}")
    return changed


def write_config(workdir: str, config: Mapping, sections: Mapping[str, Any], write: bool = True) -> None:
    """Save the resolved config (if `write`); refuse to resume a workdir whose `sections` differ."""
    changed = frozen_changes(workdir, config, sections)
    if changed:
        raise ValueError(f"{workdir} holds a run with different {', '.join(changed)}; "
                         "use a new --workdir (nothing was changed in the old one)")
    if write:
        write_json(os.path.join(workdir, "config.json"), dict(config))


def run_job(job: TrainJob, workdir: str, *, progress: bool = True):
    """Train job.state for job.loop.steps updates (resuming from WORKDIR); returns the final state.

    Raises train.faults.Preempted after saving a checkpoint when SIGTERM / SIGINT arrives, and NonFiniteError on
    a NaN / Inf loss or gradient (loop.on_nonfinite); checkpoints already saved are kept.
    """
    tc, main = job.loop, parallel.is_main_process()
    ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    state = job.state
    restored, restored_step = ckpt.restore_latest(state)
    if restored is not None:
        state = restored
        log.info("resuming from %s (step %d)", ckpt.step_path(restored_step), restored_step)
    start = int(state.step)
    if main:
        truncate_metrics(workdir, start)   # rows past the checkpoint are re-logged by this run

    def preview(step: int):
        if job.preview is not None:
            job.preview(state, step)

    def last_checkpoint():
        ckpt.wait()
        step = ckpt.latest_step()
        return None if step is None else ckpt.step_path(step)

    batches = Batches(job.source, tc.batch_size, seed=job.data.seed, random_flip=job.data.random_flip)
    guard = NonFiniteGuard(tc.on_nonfinite, last_checkpoint)
    writer = MetricWriter(workdir) if main else None
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and main), desc=job.name, unit="step",
               dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), start
    pending = None   # (step, metrics) not yet checked: checked one step late, so the device stays busy
    try:
        with SignalCatcher() as signals:
            for step, batch in zip(range(start, tc.steps), batches.iterate(start)):
                state, metrics = job.step(state, parallel.shard_batch(batch, job.mesh))
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
                    bar.set_postfix({k: f"{float(metrics[k]):.4g}" for k in job.show})
                if signals.received and done != tc.steps:
                    ckpt.save(done, state, job.config)
                    ckpt.wait()
                    raise Preempted(signals.received, done, ckpt.step_path(done))
                if done % tc.ckpt_every == 0 and done != tc.steps:
                    ckpt.save(done, state, job.config)
                if tc.sample_every and done % tc.sample_every == 0 and done != tc.steps:
                    preview(done)
            if int(state.step) > start or ckpt.latest_step() is None:
                ckpt.save(int(state.step), state, job.config)
                preview(int(state.step))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        ckpt.wait()
        ckpt.close()
    return state
