"""From a trained network to samples: wraps the module into a `denoise_fn(x, t)` and jits a sampler end
to end. Samplers themselves (diffusion_jax.samplers) never see a module or a config."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parallel
from diffusion_jax.models.functional import make_apply_fn
from diffusion_jax.objectives.edm import edm_denoise
from diffusion_jax.samplers import Guidance, run_sampler, sampler_options
from diffusion_jax.samplers.diffusers_import import sampler_from_diffusers
from diffusion_jax.samplers.registry import get_sampler


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """What to run: a sampler name from `samplers.SAMPLERS` and its options (all static for jit).

    options: sampler-specific options as (name, value) pairs, e.g. (("eta", 0.5),) for ddim or
    (("s_churn", 40.0),) for edm; `samplers.sampler_options(name)` lists them.
    guidance_scale: classifier-free guidance weight w for class-conditional models (1 = off), the
    unconditional branch using the null class.
    scheduler_config: a diffusers scheduler_config.json to sample with instead (`samplers.sampler_from_diffusers`:
    it chooses the sampler, grid, spacing and clipping; steps, options and guidance still apply).
    """
    sampler: str = "ddim"
    steps: int = 50
    spacing: str = "leading"
    clip_denoised: float | None = 1.0
    options: tuple[tuple[str, Any], ...] = ()
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    scheduler_config: str | None = None

    def validate(self) -> None:
        if self.scheduler_config is not None:
            self.imported()
        else:
            get_sampler(self.sampler, **dict(self.options))  # unknown sampler or option -> ValueError naming it

    def imported(self, schedule=None, prediction: str | None = None):
        """The `ImportedScheduler` of scheduler_config (a diffusers scheduler_config.json path) at self.steps, with
        self.options on top; checked against `schedule` (the model's noise schedule) and `prediction` (the model's
        parameterization) when given. None without one."""
        if self.scheduler_config is None:
            return None
        imp = sampler_from_diffusers(self.scheduler_config, self.steps, options=dict(self.options))
        if schedule is not None:
            edm = getattr(schedule, "kind", None) == "edm"
            imp.check_schedule(schedule, prediction=None if edm else prediction)
        return imp

    @classmethod
    def from_config(cls, sample, *, options: dict | None = None, guidance_scale: float = 1.0) -> "SamplerSpec":
        """The spec a `config.SampleConfig` describes: its sampler, steps, spacing and clip_denoised, with its
        eta and variance passed on to the samplers that take them; `options` are added on top (and win)."""
        accepted = sampler_options(sample.sampler)
        merged = {k: getattr(sample, k) for k in ("eta", "variance") if k in accepted}
        merged.update(options or {})
        return cls(sample.sampler, steps=sample.steps, spacing=sample.spacing, clip_denoised=sample.clip_denoised,
                   options=tuple(sorted(merged.items())), guidance_scale=guidance_scale)


def run_spec(spec: SamplerSpec, imported, denoise_fn, schedule, key, shape, *, prediction: str, guidance: Guidance,
             uncond_fn=None, x_T=None, options: dict | None = None, consistency=None):
    """(x, info) of spec's sampler on denoise_fn: the diffusers scheduler `imported` (spec.imported(schedule)) when
    not None, x_T then being the standard-normal latents it scales by init_noise_sigma, as a diffusers pipeline
    does; else `run_sampler` with spec's sampler, spacing and clipping (and a consistency model's `consistency`)."""
    guidance = guidance if guidance.active else None
    if imported is not None:
        if consistency is not None:
            raise ValueError("a consistency model is sampled by this library's samplers (e.g. 'consistency'), not by "
                             "an imported diffusers scheduler_config")
        return imported.sample(denoise_fn, key, shape, noise=x_T, guidance=guidance, uncond_fn=uncond_fn)
    return run_sampler(spec.sampler, denoise_fn, schedule, key, shape, steps=spec.steps, prediction=prediction,
                       spacing=spec.spacing, clip_denoised=spec.clip_denoised or None, guidance=guidance,
                       uncond_fn=uncond_fn, options=dict(spec.options) if options is None else options, x_T=x_T,
                       consistency=consistency)


def learned_variance(spec: SamplerSpec, imported=None) -> bool:
    """Whether the sampler reads the network's learned variance channels."""
    return imported.plan.learned_variance if imported is not None else dict(spec.options).get("variance") == "learned"


def check_model_fits(spec: SamplerSpec, learn_sigma: bool, num_classes: int | None, imported=None) -> None:
    """The sampler's needs that depend on the model: learned variances, and class labels for guidance."""
    if learned_variance(spec, imported) and not learn_sigma:
        raise ValueError("sampler option variance='learned' needs a model trained with model.learn_sigma=True")
    if spec.guidance_scale != 1.0 and num_classes is None:
        raise ValueError("guidance needs a class-conditional model (model.num_classes); this one is unconditional")


def guidance_of(spec: SamplerSpec, guidance_input: bool) -> tuple[Guidance, float | None]:
    """(the two-branch classifier-free guidance the samplers run, the w the network takes as input): a
    guidance-distilled student (`guidance_input`, model.guidance_embed_dim) gets w = spec.guidance_scale as input and
    runs one branch; any other model gets (Guidance(scale, rescale), None)."""
    if not guidance_input:
        return Guidance(spec.guidance_scale, spec.guidance_rescale), None
    if spec.guidance_rescale:
        raise ValueError(f"guidance_rescale={spec.guidance_rescale} rescales two-branch guidance; this model takes "
                         "the guidance weight as input (model.guidance_embed_dim), so it has one branch")
    return Guidance(), float(spec.guidance_scale)


def network_denoise_fn(apply: Callable, params, label, *, channels: int, keep_variance: bool = False,
                       sharding=None, schedule=None, context=None, control: dict | None = None,
                       w=None) -> Callable:
    """The network as a sampler's denoise_fn(x (N,H,W,C), t scalar or (N,)) -> prediction (N,H,W,C), or
    (N,H,W,2C) with the learned variance when keep_variance. label: (N,) int32 or None. context: (N, L, D)
    embeddings for a cross-attention network (`models.UNetCond`), or None. control: a ControlNet's keywords
    {"control": images, "conditioning_scale": ..., "guess_mode": ...} (`models.controlnet.ControlledUNet`), or None.
    w: the guidance weight, scalar or (N,), of a network that takes it as input (model.guidance_embed_dim), or None.
    sharding: constrain x
    to it, so every network call runs batch-parallel over the mesh. An EDM process (kind "edm") wraps the network in
    EDM's preconditioning: t is sigma and the output D(x; sigma) (prediction "edm")."""
    def denoise_fn(x, t):
        if sharding is not None:
            x = jax.lax.with_sharding_constraint(x, sharding)
        extra = dict(control or {})
        if w is not None:
            extra["guidance"] = jnp.broadcast_to(jnp.asarray(w, jnp.float32), x.shape[:1])
        if schedule is not None and schedule.kind == "edm":
            return edm_denoise(apply, params, x, t, schedule.sigma_data, y=label, context=context, **extra)
        out = apply(params, x, jnp.broadcast_to(t, x.shape[:1]), y=label, context=context, **extra)
        return out if keep_variance else out[..., :channels]

    return denoise_fn


def make_sample_fn(graphdef, schedule, spec: SamplerSpec, shape: tuple[int, ...], *,
                   prediction: str = "eps", learn_sigma: bool = False, num_classes: int | None = None,
                   mesh=None, condition: Callable | None = None, guess_mode: bool = False,
                   consistency=None, guidance_input: bool = False) -> Callable:
    """Returns `sample(params, key, y=None, aux=None, x_T=None, control=None) -> (images (N,H,W,C), nfe)`, compiled
    end to end.

    schedule: a forward process (`process/`: DiscreteSchedule, a schedule of sde.py, VDMSchedule;
    config.build_schedule).
    y: (N,) int32 labels for a class-conditional model (None for unconditional).
    mesh: split the N samples over its "data" axis (N must divide evenly). The noise is drawn for the
    whole batch with counter-based (partitionable) threefry, so image i's noise depends only on (key, i): a seed gives
    the same samples on 1 or 8 devices or hosts and, with a fixed-step sampler, the first n of N samples are the n
    samples.
    condition(net, y, aux) -> denoise_fn: the conditional branch the sampler runs, from net(label) -> the network's
    denoise_fn; default net(y). aux: a pytree passed through jit to it (e.g. a guiding classifier's params,
    `guidance.sampling`). Classifier-free guidance (spec.guidance_scale) runs on top, its unconditional branch
    being the network with the null class. x_T: a (N,H,W,C) float32 start to use instead of the one drawn from `key`
    (e.g. the same start for several samplers, `solver_error`); with spec.scheduler_config, the standard-normal z
    that the scheduler scales by its init_noise_sigma.
    control: a ControlNet's {"control": (N, S, S, k) images in [0, 1] (a tuple, one per ControlNet), optional
    "conditioning_scale": scalar or (num ControlNets,)} (traced: a new scale does not recompile), given to both
    branches of guidance; with `guess_mode` (diffusers) only the conditional branch sees it, with the residuals
    weighted 0.1 -> 1 from the first block to the middle one.
    consistency: a consistency model's `objectives.distill.ConsistencyParam` (`config.consistency_of(exp)`): the
    network's x0_hat becomes its consistency function f(x, t); None for any other model.
    guidance_input: the network takes the guidance weight as input (a guidance-distilled student,
    model.guidance_embed_dim): spec.guidance_scale goes to it, one network call per step (`guidance_of`).
    `config.sampling_kwargs(exp)` gives prediction, learn_sigma, num_classes, consistency and guidance_input.
    """
    spec.validate()
    sharding = None
    if mesh is not None:
        parallel.check_divisible(shape[0], mesh, "the number of samples", hint="fewer devices")
        sharding = parallel.batch_sharding(mesh)
    options = dict(spec.options)
    imported = spec.imported(schedule, prediction)
    check_model_fits(spec, learn_sigma, num_classes, imported)
    keep_variance = learned_variance(spec, imported)
    apply = make_apply_fn(graphdef)
    guidance, w = guidance_of(spec, guidance_input)

    def sample(params, key, y=None, aux=None, x_T=None, control=None):
        if control is not None:
            control = dict(control, guess_mode=guess_mode)

        def net(label, control=control):
            return network_denoise_fn(apply, params, label, channels=shape[-1],
                                      keep_variance=keep_variance, sharding=sharding,
                                      schedule=schedule, control=control, w=w)

        uncond = None
        if guidance.active:
            uncond = net(jnp.full(shape[:1], num_classes, jnp.int32), None if guess_mode else control)
        cond = net(y) if condition is None else condition(net, y, aux)
        x, info = run_spec(spec, imported, cond, schedule, key, shape, prediction=prediction, guidance=guidance,
                           uncond_fn=uncond, x_T=x_T, options=options, consistency=consistency)
        return x, info["nfe"]

    if sharding is None:
        jitted = jax.jit(sample)
    else:
        jitted = jax.jit(sample, out_shardings=(sharding, parallel.replicated(mesh)))

    def run(params, key, y=None, aux=None, x_T=None, control=None):
        if sharding is not None:
            params, aux = jax.device_put((params, aux), parallel.replicated(mesh))
            y = None if y is None else jax.device_put(y, sharding)
            x_T = None if x_T is None else jax.device_put(x_T, sharding)
            if control is not None:
                control = dict(control, control=jax.device_put(control["control"], sharding))
        x, nfe = jitted(params, key, y, aux, x_T, control)
        return x, int(nfe)

    return run


def sample_from(sample: Callable, params, x_T, labels=None, *, batch: int, key=None):
    """(x (N, ...) numpy, nfe): `sample` (make_sample_fn's, compiled for `batch` images) from the given starts x_T
    (N, ...) and labels (N,) or None, `batch` at a time; the last chunk is padded to `batch` (one compile) and cut."""
    x_T = np.asarray(x_T)
    out, nfe = [], 0
    for i in range(0, len(x_T), batch):
        pad = lambda a: jnp.asarray(np.resize(np.asarray(a[i:i + batch]), (batch,) + np.shape(a)[1:]))
        x, nfe = sample(params, key, None if labels is None else pad(labels), None, pad(x_T))
        out.append(np.asarray(x)[:len(x_T) - i])
    return np.concatenate(out), nfe


def class_labels(num: int, num_classes: int | None):
    """Labels 0, 1, ..., num_classes-1, 0, 1, ... for a grid (None when unconditional)."""
    return None if num_classes is None else jnp.arange(num, dtype=jnp.int32) % num_classes
