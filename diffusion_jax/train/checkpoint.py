"""Orbax checkpoints of the TrainState, with the resolved config saved beside each one.

Layout: WORKDIR/checkpoints/<step>/{state, config}; WORKDIR/config.json is the resolved config of the run
(EDM's training_options.json). Saving is asynchronous by default: training continues while the arrays are
written, and `wait()` blocks until the last save is on disk.

A save is written to `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only when complete (orbax's
atomic finalize), so a process killed mid-save leaves a directory that is never restored. A finished
checkpoint that cannot be read (truncated, corrupted) is moved to WORKDIR/checkpoints-corrupt/<step> by
`restore_latest`, which names it and falls back to the previous one; nothing is deleted.
"""
from __future__ import annotations

import os
import shutil
import warnings

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """No checkpoint in a workdir could be restored."""


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def save(self, step: int, state, config: dict) -> bool:
        """Save at `step` (forced: the caller decides when). Returns whether a save was started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
        return self.manager.save(int(step), args=args, force=True)

    def restore(self, abstract_state, step: int | None = None):
        """Restore into the structure, dtypes and shardings of `abstract_state`
        (a pytree of jax.ShapeDtypeStruct with .sharding, or of arrays)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(_as_abstract, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return restored["state"]

    def restore_latest(self, abstract_state):
        """(state, step) from the newest checkpoint that can be read, or (None, None) when there is none.

        Checkpoints that fail to restore are moved aside (and named in a warning) only once an older one
        has restored, so a changed state structure (e.g. optim.grad_clip switched on) moves nothing and
        raises CheckpointError naming every checkpoint and its error.
        """
        failures = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(abstract_state, step)
            except Exception as e:  # orbax / tensorstore / json errors all mean "cannot be read"
                failures.append((step, f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            for bad, error in failures:
                moved = self._quarantine(bad)
                warnings.warn(f"checkpoint {self.step_path(bad)} could not be restored ({error}); moved to "
                              f"{moved} and resumed from step {step} ({self.step_path(step)})",
                              RuntimeWarning, stacklevel=2)
            return state, step
        if failures:
            listing = "; ".join(f"{self.step_path(s)}: {e}" for s, e in failures)
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored ({listing}). If the "
                                  "optimizer settings changed since they were saved, restore them; otherwise "
                                  "the files are damaged: move the directory away to start over")
        return None, None

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
        self.manager.wait_until_finished()

    def close(self) -> None:
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
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (diffusion-jax train)")
        tx, _ = make_optimizer(exp.optim, exp.train.steps, exp.model)
        gamma = learned_gamma(exp.schedule)
        abstract = jax.eval_shape(make_init_fn(exp.model, tx, jax.random.PRNGKey(0), gamma))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        state = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    return exp, model_graphdef(exp.model, gamma), state.ema_params, int(step)
