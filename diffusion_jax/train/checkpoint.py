"""Orbax checkpoints of the TrainState, with the resolved config saved beside each one.

Layout: WORKDIR/checkpoints/<step>/{state, config}; WORKDIR/config.json is the resolved config of the run
(EDM's training_options.json). Saving is asynchronous by default: training continues while the arrays are
written, and `wait()` blocks until the last save is on disk.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

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


def load_trained(workdir: str, step: int | None = None):
    """(experiment, graphdef, ema_params, step) of the latest (or given) checkpoint in a training workdir."""
    from diffusion_jax.config import Experiment, load_workdir_config
    from diffusion_jax.train.state import make_init_fn, make_optimizer, model_graphdef

    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    exp = Experiment.from_config(load_workdir_config(workdir))
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (diffusion-jax train)")
        tx, _ = make_optimizer(exp.optim, exp.train.steps)
        abstract = jax.eval_shape(make_init_fn(exp.model, tx, jax.random.PRNGKey(0)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        state = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    return exp, model_graphdef(exp.model), state.ema_params, int(step)
