"""train_and_evaluate(experiment, workdir): diffusion training, a `runner.TrainJob` of the host loop.

What is diffusion's here: the data checks against the model, the train state (params, EMA, optimizer; a learned
VDM gamma inside the params), the objective's jitted step (`state.make_train_step`) and the sample grids written
during and after training. Resume, checkpoints, metrics, signals and non-finite checks are the shared host loop's
(`runner.run_job`). Resumes from the latest readable checkpoint in WORKDIR when there is one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import jax
import numpy as np

from diffusion_jax import parallel, viz
from diffusion_jax.config import Experiment, build_schedule, learned_gamma, sampling_kwargs
from diffusion_jax.data import load_source
from diffusion_jax.data.conditions import ControlSource
from diffusion_jax.models.layers import is_guidance_param
from diffusion_jax.models.registry import backbone
from diffusion_jax.inference.sampling import SamplerSpec, class_labels, make_sample_fn
from diffusion_jax.train import runner
from diffusion_jax.train.checkpoint import Checkpointer, load_trained
from diffusion_jax.train.state import (
    StepOptions,
    create_train_state,
    make_optimizer,
    make_train_step,
    trainable_rule,
)

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


def with_control(exp: Experiment, source):
    """The source itself, or for a model with a `condition` (a ControlNet, models/controlnet.py) the source whose
    examples also hold "control": that condition of each image (data.conditions), checked against the model."""
    if not hasattr(exp.model, "condition"):
        return source
    name = exp.model.condition
    if name is None:
        raise ValueError(f"model.condition=None: training needs the condition that turns data '{exp.data.name}' into "
                         "control images, e.g. --config.model.condition=canny (data/conditions.py)")
    if exp.latent.vae_workdir is not None:
        raise ValueError("a ControlNet on a latent diffusion run is not supported by train yet: its control images "
                         "would be the pixel images behind the cached latents; train it on a pixel-space base")
    source = ControlSource(source, name)
    size, _, k = source.control_shape
    if k != exp.model.conditioning_channels:
        raise ValueError(f"model.conditioning_channels={exp.model.conditioning_channels} but condition {name!r} of "
                         f"data '{exp.data.name}' has {k} channel(s)")
    if size != exp.model.control_size:
        raise ValueError(f"the control images of data '{exp.data.name}' are {size}x{size} but model.control_size is "
                         f"{exp.model.control_size} (model.image_size * 2**(len(model.embedding_channels) - 1))")
    return source


def check_base_run(exp: Experiment) -> None:
    """A network adapted from a trained run (model.base_workdir) must be trained and sampled as that run was: the
    same schedule and loss.prediction (ValueError naming the key)."""
    base = getattr(exp.model, "base_workdir", None)
    path = None if base is None else os.path.join(base, "config.json")
    if path is None or not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    ours = exp.to_dict()
    for key in sorted(saved.get("schedule", {})):
        if saved["schedule"][key] != ours["schedule"].get(key):
            raise ValueError(f"schedule.{key}={ours['schedule'].get(key)!r} but the base run {base!r} was trained "
                             f"with {saved['schedule'][key]!r}: use the base run's schedule")
    if saved.get("loss", {}).get("prediction") != exp.loss.prediction:
        raise ValueError(f"loss.prediction={exp.loss.prediction!r} but the base run {base!r} predicts "
                         f"{saved['loss']['prediction']!r}")


def load_pretrained(exp: Experiment, workdir: str, state, shardings, teacher_params=None):
    """A fresh state whose params come from trained runs: train.init_from's EMA params (fine-tuning), a student's
    teacher's (`teacher_params`, already loaded), or where the backbone says so (its registry `pretrained`, e.g. a
    ControlNet's locked base); unchanged when there is none or WORKDIR already has a checkpoint to resume."""
    hook, init, key = backbone(exp.model.name).pretrained, exp.train.init_from, "train.init_from"
    if teacher_params is not None:   # a student starts from its teacher
        init, key = exp.distill.teacher, "distill.teacher"
    if hook is None and init is None:
        return state
    if hook is not None and init is not None:
        raise ValueError(f"train.init_from={init!r}: model.name={exp.model.name!r} takes its pretrained weights from "
                         "its own base run (model.base_workdir); leave train.init_from=None")
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        if ckpt.latest_step() is not None:
            return state
    finally:
        ckpt.close()

    def load_params(run: str):
        return teacher_params if teacher_params is not None else load_trained(run, allow_latent=True)[2]

    fresh = jax.device_get(state.params)
    params = init_params(init, fresh, load_params, key) if hook is None else hook(exp.model, fresh, load_params)
    params = jax.device_put(params, shardings.params)
    ema = jax.device_put(jax.tree.map(lambda p: p + 0.0, params), shardings.ema_params)
    return state.replace(params=params, ema_params=ema)


def init_params(run: str, fresh, load_params, key: str = "train.init_from"):
    """The EMA params of run `run` (config `key`: train.init_from or distill.teacher), which must have `fresh`'s
    structure and shapes (ValueError naming the first parameter that differs: the model sections differ). The one
    exception: a student's guidance projection (model.guidance_embed_dim, `layers.GUIDANCE_PARAM`) that its teacher
    lacks keeps its fresh (zero) value, so the student starts as its teacher's conditional network."""
    try:
        params = load_params(run)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{key}={run!r}: {e}") from e
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    new = key == "distill.teacher" and not any(map(is_guidance_param, flat))
    out = []
    for path, want in jax.tree_util.tree_flatten_with_path(fresh)[0]:
        got = flat.pop(path, None)
        if got is None and new and is_guidance_param(path):
            got = want
        out.append(np.asarray(got, np.asarray(want).dtype) if got is not None else None)
        if got is None or np.shape(got) != np.shape(want):
            name = jax.tree_util.keystr(path)
            found = "missing" if got is None else f"shape {np.shape(got)}"
            raise ValueError(f"{key}={run!r} does not fit this model: its parameter {name} is {found}, this "
                             f"model's is {np.shape(want)}; give both runs the same model section")
    if flat:
        name = jax.tree_util.keystr(next(iter(flat)))
        raise ValueError(f"{key}={run!r} does not fit this model: it has parameter {name}, which this model "
                         "lacks; give both runs the same model section")
    return jax.tree.unflatten(jax.tree.structure(fresh), out)


def frozen_changes(workdir: str, exp: Experiment) -> list[str]:
    """The model / schedule / loss / latent keys in which `exp` differs from the run saved in WORKDIR ([] if none
    is)."""
    return runner.frozen_changes(workdir, exp.to_dict(), {s: getattr(exp, s) for s in _FROZEN_SECTIONS})


def write_config(workdir: str, exp: Experiment, write: bool = True) -> None:
    """Save the resolved config (if `write`); refuse to resume a workdir whose model/schedule/loss differ."""
    runner.write_config(workdir, exp.to_dict(), {s: getattr(exp, s) for s in _FROZEN_SECTIONS}, write)


@runner.holds_workdir("train")
def train_and_evaluate(exp: Experiment, workdir: str, *, progress: bool = True):
    """Train for exp.train.steps steps (resuming if WORKDIR has a checkpoint). Returns the final TrainState.

    Raises train.faults.Preempted after saving a checkpoint when SIGTERM / SIGINT arrives, and
    NonFiniteError on a NaN / Inf loss or gradient (train.on_nonfinite); checkpoints already saved are kept.
    In a multi-process run (parallel.initialize_distributed) every process calls this with the same arguments;
    process 0 writes the config, metrics, progress bar and sample grids.
    """
    tc = exp.train
    main = parallel.is_main_process()
    check_base_run(exp)
    teacher_params = None
    if exp.distill.method != "none":   # the teacher run, checked and loaded once, before anything compiles
        from diffusion_jax.train.distill import load_teacher

        teacher_params = load_teacher(exp)   # None for consistency training
    source = load_source(exp.data)
    dreambooth = hasattr(exp.model, "prior_loss_weight")   # its data are a subject's images, labelled by with_prior
    if exp.latent.vae_workdir is None and not dreambooth:
        check_data_matches_model(exp, source)
    source = with_control(exp, source)
    mesh = parallel.make_mesh(tc.num_devices)
    parallel.check_divisible(tc.batch_size, mesh, "train.batch_size")
    parallel.check_divisible(tc.sample_num, mesh, "train.sample_num")
    os.makedirs(workdir, exist_ok=True)
    write_config(workdir, exp, write=main)
    if dreambooth:   # the subject's images and the class images the base draws (process 0 draws and writes them)
        from diffusion_jax.train.dreambooth import with_prior

        if not main:
            parallel.sync("class images")
        source = with_prior(exp, workdir, source, write=main, progress=progress and main)
        if main:
            parallel.sync("class images")
        check_data_matches_model(exp, source)
    if exp.latent.vae_workdir is not None:   # latent diffusion: the VAE's latents of the data, with captions
        from diffusion_jax.train.latent import build_latent_source

        if not main:   # process 0 encodes the dataset and writes the cache; the others then read it
            parallel.sync("latent cache")
        source = build_latent_source(exp, workdir, source, progress=progress and main)
        if main:
            parallel.sync("latent cache")
        check_data_matches_model(exp, source)

    tx, lr_fn = make_optimizer(exp.optim, tc.steps, exp.model)
    gamma = learned_gamma(exp.schedule)   # a learned VDM gamma is trained with (and inside) the params
    rule = trainable_rule(exp.model)
    if gamma is not None and rule is not None:
        raise ValueError(f"model.name={exp.model.name!r} trains part of a locked network; a learned VDM gamma "
                         "(schedule.gamma='learned') would have to be trained with it: use a fixed gamma")
    graphdef, state, shardings = create_train_state(exp.model, tx, jax.random.PRNGKey(exp.seed), mesh, tc.fsdp,
                                                    learned_gamma=gamma)
    state = load_pretrained(exp, workdir, state, shardings, teacher_params)
    opts = StepOptions(tc.ema_decay, tc.ema_warmup, exp.model.learn_sigma, exp.model.num_classes,
                       skip_nonfinite=tc.on_nonfinite == "skip", trainable=rule)
    schedule = build_schedule(exp.schedule, state.params)
    distill = None
    if exp.distill.method != "none":
        from diffusion_jax.train.distill import make_distillation

        distill = make_distillation(exp, schedule, teacher_params=teacher_params)
    train_step = make_train_step(graphdef, schedule, exp.loss, tx, lr_fn, opts, mesh, shardings, distill)
    shape = (tc.sample_num, *source.image_shape)
    if exp.distill.method != "none":   # the student's own sampler: N DDIM steps, or one consistency step
        from diffusion_jax.train.distill import student_spec

        grid_spec = student_spec(exp)
    elif exp.schedule.kind == "discrete":
        grid_spec = SamplerSpec("ddim", steps=tc.sample_steps)
    else:   # the run's own sampler and spacing (DDIM's timesteps are discrete)
        grid_spec = SamplerSpec.from_config(dataclasses.replace(exp.sample, steps=tc.sample_steps))

    def grid_sampler(schedule):
        return make_sample_fn(graphdef, schedule, grid_spec, shape, mesh=mesh, **sampling_kwargs(exp))

    # `schedule` of a learned gamma holds state.params' gamma, which the step donates: only the loss reads it (its
    # spec, not its arrays); the grids rebuild it from the EMA
    sample_fn = grid_sampler(schedule) if gamma is None else None
    labels, control = class_labels(tc.sample_num, exp.model.num_classes), None
    if isinstance(source, ControlSource):   # a ControlNet: the grid follows the first examples' control images
        first = source.get(np.arange(tc.sample_num) % source.num_examples)
        control = {"control": first["control"]}
        labels = first.get("label") if exp.model.num_classes is not None else None
    if exp.latent.vae_workdir is not None:   # decoded images of the text-conditioned model, a caption per class
        from diffusion_jax.train.latent import latent_grid_fn

        sample_fn = latent_grid_fn(exp, graphdef, schedule, grid_spec, source, mesh)

    def write_samples(state, step: int):
        # a learned gamma changes as it trains: sample with the EMA's (which costs a compile per grid)
        sample = sample_fn if gamma is None else grid_sampler(build_schedule(exp.schedule, state.ema_params))
        extra = {} if control is None else {"control": control}
        images = parallel.to_host(sample(state.ema_params, jax.random.PRNGKey(exp.seed + 1), labels, **extra)[0])
        if not main:
            return
        if not np.isfinite(images).all():   # finite params can still diverge while sampling: say so, go on
            warnings.warn(f"the sample grid at step {step} has non-finite pixels; not written", RuntimeWarning)
            return
        viz.save_grid(images, os.path.join(workdir, "samples", f"step_{step:08d}.png"))

    job = runner.TrainJob("train", exp.to_dict(), tc, source, exp.data, mesh, state, train_step,
                          preview=write_samples, show=("loss", "img_per_s"))
    return runner.run_job(job, workdir, progress=progress)
