"""A diffusers `scheduler_config.json` as one of our samplers, run exactly as diffusers runs it.

    sched = sampler_from_diffusers("path/to/scheduler_config.json", 25)      # or the config as a dict
    x, info = sched.sample(denoise_fn, key, (4, 64, 64, 4))                   # denoise_fn(x, t): the network

`sampler_from_diffusers` maps the scheduler class and every config key that changes the numbers to our solver, its
options, the `Grid` of levels diffusers' `set_timesteps` would pick (`diffusers_levels`), the reading of the network
output (prediction_type, clip_sample, thresholding) and the scaling of x_T (init_noise_sigma) and of the result. A key
it cannot honour is refused with a ValueError naming it; keys that are not options of the class are listed in
`ignored` (diffusers ignores them too) and logged. `to_diffusers_config` goes the other way, for `export`.
The classes, their keys and what becomes of each: `scheduler_table()` (docs/schedulers.md is generated from it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.consistency import lcm_boundary
from diffusion_jax.samplers.diffusers_flow import FLOW_SCHEDULERS
from diffusion_jax.samplers.diffusers_keys import Keys, Plan
from diffusion_jax.samplers.diffusers_levels import betas_from_config
from diffusion_jax.samplers.diffusers_schedulers import PREDICTIONS, REFUSED, SCHEDULERS
from diffusion_jax.samplers.grid import Grid
from diffusion_jax.samplers.registry import get_sampler, most_steps_within
from diffusion_jax.samplers.wrapper import Guidance, make_denoiser

log = logging.getLogger(__name__)
_WARNED: set = set()                                      # (class, ignored keys) already logged
META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


@dataclasses.dataclass(frozen=True, eq=False)
class ImportedScheduler:
    """A diffusers scheduler config resolved for `steps` inference steps (module doc).

    scheduler: the diffusers class name; plan: our solver, options, grid and output reading (`Plan`); abar: the
    config's (T,) float64 alphas_cumprod; honoured / ignored: the config keys that set the numbers / that are not
    options of the class."""

    scheduler: str
    steps: int
    plan: Plan
    abar: np.ndarray | None
    honoured: tuple[str, ...]
    ignored: tuple[str, ...]

    @property
    def sampler(self) -> str:
        return self.plan.sampler

    @property
    def grid(self) -> Grid:
        return self.plan.grid

    def denoiser(self, denoise_fn, *, guidance: Guidance | None = None, uncond_fn=None, pair_fn=None):
        p = self.plan
        den = make_denoiser(denoise_fn, p.prediction, clip_denoised=p.clip_denoised, threshold=p.threshold,
                            rederive_eps=p.rederive_eps, guidance=guidance, uncond_fn=uncond_fn, pair_fn=pair_fn,
                            learned_variance=p.learned_variance)
        return den if p.lcm is None else lcm_boundary(den, *p.lcm)

    def sample(self, denoise_fn, key, shape, *, noise=None, guidance: Guidance | None = None, uncond_fn=None,
               pair_fn=None):
        """(x_0 (shape), info) as the diffusers pipeline gives it: x_T = init_noise_sigma z in the scheduler's
        coordinates, z = `noise` (a standard normal array of `shape`, diffusers' `latents`) or drawn from
        fold_in(key, 0); the solver's own noise from fold_in(key, 1). jit-compatible."""
        if noise is None:
            noise = jax.random.normal(jax.random.fold_in(key, 0), tuple(shape))
        elif tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise must have the shape {tuple(shape)}, got {tuple(noise.shape)}")
        solver = get_sampler(self.plan.sampler, **self.plan.options)
        den = self.denoiser(denoise_fn, guidance=guidance, uncond_fn=uncond_fn, pair_fn=pair_fn)
        key = None if key is None else jax.random.fold_in(key, 1)
        x, info = solver(den, self.plan.grid, jnp.asarray(noise) * self.plan.noise_scale, key, **self.plan.extra)
        return x * self.plan.out_scale, info

    def check_schedule(self, schedule, what: str = "the model", prediction: str | None = None) -> None:
        """ValueError unless a `DiscreteSchedule` has the config's alphas_cumprod (num_train_timesteps, the betas)
        and, when given, the model's `prediction` is the config's prediction_type; or, for an EDM scheduler, unless
        the model is an EDM process with the config's sigma_data."""
        sd = self.plan.edm_sigma_data
        if self.plan.prediction == "flow":
            if getattr(schedule, "kind", None) != "flow" or (prediction is not None and prediction != "flow"):
                raise ValueError(f"scheduler config {self.scheduler} runs a flow-matching network (velocity "
                                 f"prediction, schedule.kind='flow'); {what} is not one")
            return
        if sd is not None:
            if getattr(schedule, "kind", None) != "edm" or not np.isclose(schedule.sigma_data, sd, rtol=1e-6):
                raise ValueError(f"scheduler config {self.scheduler} runs an EDM-preconditioned network with "
                                 f"sigma_data={sd}; {what} is not one (schedule.kind='edm' with that sigma_data)")
            return
        ours = np.asarray(getattr(schedule, "alphas_cumprod", None) if getattr(schedule, "discrete", False) else [])
        if ours.shape != self.abar.shape or not np.allclose(ours, self.abar, rtol=1e-4, atol=1e-7):
            raise ValueError(f"scheduler config {self.scheduler}: its betas (num_train_timesteps, beta_schedule, "
                             f"beta_start, beta_end, trained_betas, rescale_betas_zero_snr) give another noise "
                             f"schedule than {what}'s; give the scheduler config the model was trained with")
        if prediction is not None and prediction != self.plan.prediction:
            theirs = {v: k for k, v in PREDICTIONS.items()}
            raise ValueError(f"scheduler config {self.scheduler}: prediction_type="
                             f"{theirs.get(self.plan.prediction, self.plan.prediction)!r}, but {what} predicts "
                             f"{prediction!r} (prediction_type={theirs.get(prediction, prediction)!r})")


def load_scheduler_config(source) -> dict:
    """A config dict, or the path of a scheduler_config.json (or of a folder holding one, or its scheduler/). As in
    diffusers' from_config, the keys listed in `_use_default_values` (an in-memory `scheduler.config` carries it)
    are dropped, so that the class's own defaults apply."""
    if isinstance(source, dict):
        return _without_used_defaults(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        candidates = (os.path.join(path, "scheduler_config.json"),
                      os.path.join(path, "scheduler", "scheduler_config.json"))
        for cand in candidates:
            if os.path.isfile(cand):
                path = cand
                break
        else:
            raise FileNotFoundError(f"no scheduler_config.json in {path} or {os.path.join(path, 'scheduler')}")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object (a diffusers scheduler config)")
    return _without_used_defaults(cfg)


def _without_used_defaults(cfg: dict) -> dict:
    used = cfg.get("_use_default_values") or []
    return {k: v for k, v in cfg.items() if k not in used and k != "_use_default_values"}


def check_scheduler_class(cfg: dict) -> str:
    """The config's _class_name, or a ValueError: a class we refuse (with the reason) or do not know."""
    name = cfg.get("_class_name")
    if name in REFUSED:
        raise ValueError(f"scheduler config: _class_name={name!r} is not supported: it {REFUSED[name]}")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler config: _class_name={name!r} is unknown; supported: {sorted(SCHEDULERS)}")
    return name


def count_nfe_diffusers(config, steps: int, options: dict | None = None) -> int:
    """Network evaluations of the scheduler `config` at `steps` inference steps (traced, nothing compiled)."""
    imp = sampler_from_diffusers(config, steps, options=options)
    seen = {}

    def trace(x):
        out, info = imp.sample(lambda x, t: x, jax.random.PRNGKey(0), x.shape, noise=x)
        seen["nfe"] = info["nfe"]
        return out

    jax.eval_shape(trace, jax.ShapeDtypeStruct((1, 1), jnp.float32))
    return int(seen["nfe"])


def steps_for_nfe_diffusers(config, nfe: int, options: dict | None = None) -> tuple[int, int]:
    """(steps, exact NFE): the most inference steps whose NFE does not exceed `nfe` (`registry.most_steps_within`)."""
    cfg = load_scheduler_config(config)
    T = int(cfg.get("num_train_timesteps", 1000))
    return most_steps_within(lambda k: count_nfe_diffusers(cfg, k, options), nfe, min(nfe, T),
                             f"scheduler config {cfg.get('_class_name')}")


def sampler_from_diffusers(config, steps: int, *, options: dict | None = None, mu: float | None = None
                           ) -> ImportedScheduler:
    """The diffusers scheduler `config` (a dict or a path, see load_scheduler_config) at `steps` inference steps.
    options: further options of our solver that diffusers takes in the pipeline call, e.g. {"eta": 0.5} for DDIM.
    mu: the pipeline's set_timesteps(mu=...) of a FlowMatch scheduler with use_dynamic_shifting (Flux)."""
    cfg = load_scheduler_config(config)
    name = check_scheduler_class(cfg)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps (num_inference_steps) must be a positive int, got {steps!r}")
    entry = SCHEDULERS[name]
    c = Keys(name, cfg, entry.defaults)
    T = c.int("num_train_timesteps", 1)
    if steps > T and name not in ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"):
        raise ValueError(f"steps={steps} exceeds num_train_timesteps={T} of the scheduler config")
    if mu is not None and name not in FLOW_SCHEDULERS:
        raise ValueError(f"mu (dynamic shifting) applies to the FlowMatch schedulers, not {name}")
    plan = entry.build(c, int(steps), mu) if name in FLOW_SCHEDULERS else entry.build(c, int(steps))
    if options:
        plan.options = {**plan.options, **options}
    get_sampler(plan.sampler, **plan.options)                   # an option the solver lacks -> ValueError naming it
    abar = None if plan.edm_sigma_data is not None or plan.prediction == "flow" else np.cumprod(
        1.0 - betas_from_config(Keys(name, cfg, entry.defaults)))
    ignored = tuple(sorted(k for k in cfg if k not in entry.defaults and k not in META_KEYS))
    if ignored and (name, ignored) not in _WARNED:
        _WARNED.add((name, ignored))
        log.warning("scheduler config %s: not options of %s (ignored, as diffusers ignores them): %s", name, name,
                    ", ".join(ignored))
    unhandled = [k for k in cfg if k in entry.defaults and k not in c.read and k not in entry.neutral
                 and cfg[k] != entry.defaults[k]]
    if unhandled:                                          # never silently: a key no builder read is refused
        raise ValueError(f"scheduler config {name}: {', '.join(f'{k}={cfg[k]!r}' for k in unhandled)} "
                         f"is not handled by diffusion_jax")
    return ImportedScheduler(name, int(steps), plan, abar, tuple(sorted(c.read)), ignored)
