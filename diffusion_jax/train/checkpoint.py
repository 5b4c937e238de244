"""Orbax checkpoints of the TrainState, with the resolved config saved beside each one.

Layout: WORKDIR/checkpoints/<step>/{state, config}; WORKDIR/config.json is the resolved config of the run
(EDM's training_options.json). Saving is asynchronous by default: training continues while the arrays are
written, and `wait()` blocks until the last save is on disk.

A save is written to `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only when complete (orbax's
atomic finalize), so a process killed mid-save leaves a directory that is never restored; then its manifest
(`train.manifest`: the SHA-256 of every file) is written, and every restore checks it first, so a changed byte is
caught. A finished checkpoint that cannot be read (truncated, corrupted) is moved to
WORKDIR/checkpoints-corrupt/<step> by `restore_latest` (training), which names it and falls back to the previous
one; readers (`restore_newest_good`: sample, export, ...) skip it with a warning and use the newest good one.
Nothing is deleted.
"""
from __future__ import annotations

import os
import shutil
import warnings

import jax
import orbax.checkpoint as ocp

from diffusion_jax import parallel
from diffusion_jax.train.manifest import verify, write_manifest


class CheckpointError(ValueError):
    """No checkpoint in a workdir could be restored."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint's files differ from its manifest (train.manifest)."""


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))
        self._unhashed: list[int] = []   # steps saved here whose manifest is not written yet

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def save(self, step: int, state, config: dict) -> bool:
        """Save at `step` (forced: the caller decides when). Returns whether a save was started. Its manifest
        (train.manifest) is written once the save is complete: at the next save, `wait` or `close`."""
        self._write_manifests()   # waits for the previous (asynchronous) save
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
        started = self.manager.save(int(step), args=args, force=True)
        if started:
            self._unhashed.append(int(step))
        return started

    def _write_manifests(self) -> None:
        self.manager.wait_until_finished()
        if not parallel.is_main_process():
            self._unhashed.clear()
            return
        while self._unhashed:
            step = self._unhashed.pop(0)
            if os.path.isdir(self.step_path(step)):   # (max_to_keep may have removed it already)
                write_manifest(self.step_path(step))

    def verify(self, step: int) -> None:
        """CheckpointCorrupt naming the files of checkpoint `step` that differ from its manifest (none: it passes;
        a checkpoint without a manifest passes unverified)."""
        problems = verify(self.step_path(step))
        if problems:
            raise CheckpointCorrupt(f"checkpoint {self.step_path(step)} is corrupt: {'; '.join(problems[:3])}"
                                    + (f" (and {len(problems) - 3} more files)" if len(problems) > 3 else ""))

    def restore(self, abstract_state, step: int | None = None):
        """Restore into the structure, dtypes and shardings of `abstract_state`
        (a pytree of jax.ShapeDtypeStruct with .sharding, or of arrays), after checking its manifest."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.verify(step)
        target = jax.tree.map(_as_abstract, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return restored["state"]

    def restore_newest_good(self, abstract_state, step: int | None = None):
        """(state, step) for a reader (sample, export, ...): checkpoint `step`, or else the newest one that verifies
        and restores, skipping the others with a warning naming each (nothing is moved: that is train's to do).
        CheckpointError naming every checkpoint and its error when none can be read."""
        steps = [int(step)] if step is not None else list(reversed(self.all_steps()))
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}: train first (diffusion-jax train)")
        if step is not None and step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory} (there are "
                                    f"{self.all_steps()})")
        state, good, failures = self._first_readable(abstract_state, steps)
        for bad, error in failures:
            if good is not None:
                warnings.warn(f"checkpoint {self.step_path(bad)} could not be restored ({error}); using step {good}",
                              RuntimeWarning, stacklevel=2)
        if good is None:
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored ({self._listing(failures)}); "
                                  "`diffusion-jax check-workdir` lists what is wrong")
        return state, good

    def restore_latest(self, abstract_state):
        """(state, step) from the newest checkpoint that can be read, or (None, None) when there is none.

        Checkpoints that fail to restore are moved aside (and named in a warning) only once an older one
        has restored, so a changed state structure (e.g. optim.grad_clip switched on) moves nothing and
        raises CheckpointError naming every checkpoint and its error.
        """
        state, good, failures = self._first_readable(abstract_state, list(reversed(self.all_steps())))
        if good is None and failures:
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored ({self._listing(failures)}). "
                                  "If the optimizer settings changed since they were saved, restore them; otherwise "
                                  "the files are damaged: move the directory away to start over")
        for bad, error in failures:
            moved = self._quarantine(bad)
            warnings.warn(f"checkpoint {self.step_path(bad)} could not be restored ({error}); moved to "
                          f"{moved} and resumed from step {good} ({self.step_path(good)})",
                          RuntimeWarning, stacklevel=2)
        return state, good

    def _first_readable(self, abstract_state, steps):
        """(state, step, [(step, error) of the newer ones that failed]) of the first of `steps` that restores;
        (None, None, failures) when none does."""
        failures = []
        for step in steps:
            try:
                return self.restore(abstract_state, step), step, failures
            except Exception as e:  # orbax / tensorstore / json / manifest errors all mean "cannot be read"
                failures.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))
        return None, None, failures

    def _listing(self, failures) -> str:
        return "; ".join(f"{self.step_path(s)}: {e}" for s, e in failures)

    def _quarantine(self, step: int) -> str:
        target_dir = os.path.join(os.path.dirname(self.directory), "checkpoints-corrupt")
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, str(step))
        suffix = 1
        while os.path.exists(target):
            target, suffix = os.path.join(target_dir, f"{step}.{suffix}"), suffix + 1
        shutil.move(self.step_path(step), target)
        self.manager.reload()
        return target

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def wait(self) -> None:
        self._write_manifests()

    def close(self) -> None:
        self._write_manifests()
        self.manager.close()


def _as_abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def load_trained(workdir: str, step: int | None = None, *, allow_latent: bool = False):
    """(experiment, graphdef, ema_params, step) of the latest (or given) checkpoint in a training workdir.
    A latent diffusion run (config latent.vae_workdir) is refused unless allow_latent: its samples are latents
    (`pipelines.trained.load_latent_run` decodes them)."""
    from diffusion_jax.config import Experiment, learned_gamma, load_workdir_config
    from diffusion_jax.train.state import make_init_fn, make_optimizer, model_graphdef

    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    exp = Experiment.from_config(load_workdir_config(workdir))
    if exp.latent.vae_workdir is not None and not allow_latent:
        raise ValueError(f"{workdir!r} is a text-conditioned latent diffusion run (latent.vae_workdir="
                         f"{exp.latent.vae_workdir!r}): use diffusion-jax generate --workdir {workdir} --prompt ...")
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        tx, _ = make_optimizer(exp.optim, exp.train.steps, exp.model)
        gamma = learned_gamma(exp.schedule)
        abstract = jax.eval_shape(make_init_fn(exp.model, tx, jax.random.PRNGKey(0), gamma))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        state, step = ckpt.restore_newest_good(abstract, step)
    finally:
        ckpt.close()
    return exp, model_graphdef(exp.model, gamma), state.ema_params, int(step)
