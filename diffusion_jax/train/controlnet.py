"""Sampling with the ControlNets this project trains (model.name="controlnet", models/controlnet.py): one workdir, or
several trained on the same base (their residuals summed, diffusers' MultiControlNetModel), and their control images
read from files or computed from an image with each ControlNet's own condition (data/conditions.py).

    run = load_controlnets(["workdirs/edges", "workdirs/lowres"])     # one ControlledUNet over both
    control = run.controls(num=16, files=["edges.png", "lowres.png"])   # or from_images=["photo.png", "photo.png"]
    sample(run.params, key, labels, control={"control": control, "conditioning_scale": (1.0, 0.5)})
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from diffusion_jax.data.conditions import make_condition
from diffusion_jax.inference.editing.files import load_image, read_control
from diffusion_jax.models.controlnet import ControlledUNet
from diffusion_jax.train.checkpoint import load_trained


@dataclasses.dataclass
class ControlRun:
    exp: object                 # the first workdir's Experiment (schedule, loss, sample, the base model)
    graphdef: object            # ControlledUNet with one ControlNet per workdir
    params: dict                # {"base": ..., "controlnets": {i: ...}}
    step: int
    workdirs: tuple[str, ...]
    configs: tuple                # each ControlNet's model section (condition, control size and channels)

    def controls(self, num: int, *, files=(), from_images=()) -> tuple[np.ndarray, ...]:
        """One (num, S, S, c) control batch in [0, 1] per ControlNet: a control image file each (`files`), or an
        image each (`from_images`, the base model's size) turned into that ControlNet's condition."""
        k = len(self.workdirs)
        given = files if files else from_images
        if bool(files) == bool(from_images) or len(given) != k:
            raise ValueError(f"give one control image per ControlNet ({k}: {', '.join(self.workdirs)}), either all "
                             f"as --control FILE or all as --control-from IMAGE; got {len(files)} --control and "
                             f"{len(from_images)} --control-from")
        out = []
        for cfg, path in zip(self.configs, given):
            if files:
                control = read_control(path, cfg.control_size, cfg.conditioning_channels)
            else:
                if cfg.condition is None:
                    raise ValueError("--control-from needs a ControlNet whose model.condition names how its control "
                                     "images are made; this one takes them as files only: use --control FILE")
                image = load_image(path, size=cfg.image_size, channels=cfg.in_channels)
                control = make_condition(cfg.condition, image)
            out.append(np.repeat(control, num, axis=0))
        return tuple(out)


def load_controlnets(workdirs, step: int | None = None) -> ControlRun:
    """The ControlNet workdirs as one ControlledUNet: the first one's base and schedule, every one's ControlNet.
    ValueError when a workdir is not a ControlNet run, or when they were trained on different base weights."""
    workdirs = tuple(workdirs)
    runs = [load_trained(w, step if i == 0 else None) for i, w in enumerate(workdirs)]
    for w, (exp, *_rest) in zip(workdirs, runs):
        if exp.model.name != "controlnet":
            raise ValueError(f"{w!r} is a model.name={exp.model.name!r} run, not a ControlNet: control images need a "
                             "workdir trained with model.name='controlnet' (configs/controlnet_digits.py)")
    exp0, graph0, params0, step0 = runs[0]
    base = jax.tree.leaves(params0["base"])
    for w, (exp, _, params, _) in zip(workdirs[1:], runs[1:]):
        if exp.model.base != exp0.model.base or exp.schedule != exp0.schedule:
            raise ValueError(f"{w!r} was trained on another base model or schedule than {workdirs[0]!r}: several "
                             "ControlNets must share one base")
        if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["base"]), base)):
            raise ValueError(f"{w!r} was trained on other base weights than {workdirs[0]!r} (model.base_workdir "
                             f"{exp.model.base_workdir!r} vs {exp0.model.base_workdir!r})")
    configs = tuple(r[0].model for r in runs)
    if len(workdirs) == 1:
        return ControlRun(exp0, graph0, params0, step0, workdirs, configs)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ControlledUNet(exp0.model, rngs=nnx.Rngs(0),
                                                                  num_controlnets=len(workdirs))))
    params = {"base": params0["base"], "controlnets": {i: r[2]["controlnets"][0] for i, r in enumerate(runs)}}
    return ControlRun(exp0, graphdef, params, step0, workdirs, configs)
