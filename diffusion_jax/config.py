"""The typed boundary: ml_collections configs in, frozen dataclasses out.

Config files (configs/*.py) define `get_config(arg: str | None = None) -> ConfigDict`. They are the only
place where strings choose objects; this module loads them (`path.py` or `path.py:arg`), applies
command-line overrides (`train.steps=200`), and turns the result into an `Experiment` of frozen
dataclasses that the library consumes. Every value is checked here, before anything is compiled, and
every error names the config key.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os
import types
import typing
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from diffusion_jax.data import DataConfig
from diffusion_jax.models import UNetConfig
from diffusion_jax.models.registry import backbone, config_class, names_of_kind
from diffusion_jax.objectives.build import validate_loss
from diffusion_jax.objectives.discrete import LossConfig
from diffusion_jax.objectives.distill import ConsistencyParam, DistillConfig, check_distill
from diffusion_jax.objectives.vdm import gamma_params_of
from diffusion_jax.process.vdm import LinearGamma, MonotoneGamma, VDMSchedule
from diffusion_jax.process.discrete import check_schedule, make_schedule
from diffusion_jax.process.flow import FLOWS
from diffusion_jax.process.sde import SDES

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """kind "discrete": DDPM betas (name, num_timesteps, beta_*, zero_terminal_snr), trained with
    `objectives.discrete.diffusion_loss`. kind "vp" | "subvp" | "ve": score_sde's SDEs (beta_min / beta_max; sigma_min /
    sigma_max), trained with continuous-time DSM (`dsm.py`). kind "edm": Karras et al.'s sigma(t) = t
    (sigma_min / sigma_max / sigma_data), trained with EDM's loss (`edm.py`). kind "vdm": VDM's gamma(t) = -log SNR,
    gamma "linear" (fixed) or "learned" (monotone network trained with the U-Net), from gamma_min to gamma_max,
    trained with VDM's continuous VLB (`vdm.py`). kind "flow": flow matching's linear interpolant (rectified flow) with
    SD3's timestep `shift`, trained with flow matching (`objectives/flow.py`). None = the schedule's own default."""
    kind: str = "discrete"
    name: str = "linear"
    num_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool = False
    beta_min: float | None = None
    beta_max: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    sigma_data: float | None = None
    gamma: str = "linear"
    gamma_min: float | None = None
    gamma_max: float | None = None
    shift: float | None = None             # flow: SD3's timestep shift (process.flow.RectifiedFlow; 1 = none)


SCHEDULE_KINDS = ("discrete", "vp", "subvp", "ve", "edm", "vdm", "flow")
_CONTINUOUS = {**SDES, **FLOWS}
VDM_GAMMAS = ("linear", "learned")
_SDE_FIELDS = {"vp": ("beta_min", "beta_max"), "subvp": ("beta_min", "beta_max"), "ve": ("sigma_min", "sigma_max"),
               "edm": ("sigma_min", "sigma_max", "sigma_data"), "vdm": ("gamma_min", "gamma_max"), "flow": ("shift",)}


def build_schedule(sc: ScheduleConfig, params=None):
    """The process a ScheduleConfig describes: a `process.discrete.DiscreteSchedule`, an SDE of `process/sde.py` or
    a `process.vdm.VDMSchedule`. params: the trained params, needed (only) by a learned VDM gamma, which is part of
    them."""
    if sc.kind == "discrete":
        return make_schedule(sc.name, sc.num_timesteps, beta_start=sc.beta_start, beta_end=sc.beta_end,
                             zero_terminal_snr=sc.zero_terminal_snr)
    values = {k: getattr(sc, k) for k in _SDE_FIELDS[sc.kind] if getattr(sc, k) is not None}
    if sc.kind != "vdm":
        return _CONTINUOUS[sc.kind](**values)
    gamma = vdm_gamma(sc)
    if sc.gamma == "linear":
        return VDMSchedule(gamma, {})
    if params is None:
        raise ValueError("schedule.gamma='learned' is part of the trained params: build the schedule from a run's "
                         "params (build_schedule(config, params))")
    return VDMSchedule(gamma, gamma_params_of(params))


def vdm_gamma(sc: ScheduleConfig):
    """VDM's gamma(t) spec for kind "vdm": `vdm.LinearGamma` or the learned `vdm.MonotoneGamma`; None otherwise."""
    if sc.kind != "vdm":
        return None
    ends = {k: getattr(sc, k) for k in ("gamma_min", "gamma_max") if getattr(sc, k) is not None}
    return LinearGamma(**ends) if sc.gamma == "linear" else MonotoneGamma(**ends)


def learned_gamma(sc: ScheduleConfig):
    """The `vdm.MonotoneGamma` a run trains next to its network (schedule.gamma='learned'), else None."""
    gamma = vdm_gamma(sc)
    return gamma if gamma is not None and sc.gamma == "learned" else None


def _check_schedule_kind(sc: ScheduleConfig) -> None:
    if sc.kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule.kind={sc.kind!r} is unknown; choose from {SCHEDULE_KINDS}")
    continuous = {"beta_min", "beta_max", "sigma_min", "sigma_max", "sigma_data", "gamma_min", "gamma_max", "shift"}
    allowed = set(_SDE_FIELDS.get(sc.kind, ()))
    for key in sorted(continuous - allowed):
        if getattr(sc, key) is not None:
            raise ValueError(f"schedule.{key} does not apply to schedule.kind={sc.kind!r}"
                             + (f" (it takes {sorted(allowed)})" if allowed else ""))
    if sc.kind != "vdm" and sc.gamma != "linear":
        raise ValueError(f"schedule.gamma applies to schedule.kind='vdm' only, got kind={sc.kind!r}")
    if sc.kind == "vdm" and sc.gamma not in VDM_GAMMAS:
        raise ValueError(f"schedule.gamma={sc.gamma!r} is unknown; choose from {VDM_GAMMAS}")
    for key in sorted(allowed - {"gamma_min", "gamma_max"}):   # gamma = -log SNR may take any sign
        value = getattr(sc, key)
        if value is not None and not value > 0:
            raise ValueError(f"schedule.{key} must be > 0, got {value!r}")
    lo, hi = {"vp": ("beta_min", "beta_max"), "subvp": ("beta_min", "beta_max"),
              "vdm": ("gamma_min", "gamma_max")}.get(sc.kind, ("sigma_min", "sigma_max"))
    if sc.kind not in ("discrete", "flow"):       # the flow's shift is its only setting, checked by RectifiedFlow
        built = vdm_gamma(sc) if sc.kind == "vdm" else build_schedule(sc)
        if not getattr(built, lo) < getattr(built, hi):
            raise ValueError(f"schedule.{lo}={getattr(built, lo)} must be < schedule.{hi}={getattr(built, hi)}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 2e-4
    warmup_steps: int = 5000          # linear warmup from 0 (Ho et al. 2020)
    decay: str = "constant"           # constant | cosine (to 0 at train.steps)
    weight_decay: float = 0.0         # AdamW decoupled weight decay
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0            # global-norm clipping; 0 disables


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 800_000
    batch_size: int = 128             # global batch, split over devices
    ema_decay: float = 0.9999
    ema_warmup: bool = False          # decay min(ema_decay, (1+step)/(10+step)) for short runs
    num_devices: int = 0              # 0 = all available
    fsdp: bool = False                # shard params / optimizer state / EMA over the "data" axis
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    sample_every: int = 0             # 0 = only at the end
    sample_num: int = 64
    sample_steps: int = 50            # DDIM steps for the grids written during training
    on_nonfinite: str = "stop"        # a NaN/Inf loss or gradient: "stop" the run, or "skip" the update
    init_from: str | None = None      # a trained workdir whose EMA params start a fresh run (same model section;
                                      # fine-tuning, e.g. a 2-rectified flow from its 1-rectified flow)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    sampler: str = "ddim"             # any name in diffusion_jax.samplers.SAMPLERS
    steps: int = 50
    eta: float = 0.0                  # used by samplers with an eta option (ddim, euler_ancestral)
    spacing: str = "leading"
    variance: str = "fixed_small"     # ddpm only: fixed_small | fixed_large | learned
    clip_denoised: float = 1.0        # clip x0-hat to [-c, c]; 0 disables
    num: int = 64


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    """Latent diffusion (Rombach et al. 2022) with text conditioning: the U-Net is trained on the latents of an
    autoencoder run (configs/vae.py), under cross-attention on the text encoder's hidden states of a caption per
    image, a template filled with the image's class name (e.g. "a photo of a {}" -> "a photo of a sandal").
    vae_workdir None = diffusion in pixel space (the other keys are then unused)."""
    vae_workdir: str | None = None
    captions: tuple[str, ...] = ("a photo of a {}",)   # one drawn per image (fixed per image by data.seed)
    text_encoder: str = "minilm"      # all-MiniLM-L6-v2 (D = 384), the pretrained encoder that works offline
    max_length: int = 16              # tokens per caption ([CLS] ... [SEP] + padding)

    def validate(self, context_dim: int | None) -> None:
        if self.vae_workdir is None:
            if context_dim is not None:
                raise ValueError(f"model.context_dim={context_dim} conditions on captions, which come with latent "
                                 "diffusion: set latent.vae_workdir to the workdir of an autoencoder run (configs/vae.py)")
            return
        if context_dim is None:
            raise ValueError("latent.vae_workdir is set: latent runs are text-conditioned, set model.context_dim "
                             "(384 for latent.text_encoder='minilm')")
        if self.text_encoder != "minilm":
            raise ValueError(f"latent.text_encoder={self.text_encoder!r} is unknown; 'minilm' is the one built in")
        if not self.captions or not all(isinstance(c, str) and "{}" in c for c in self.captions):
            raise ValueError(f"latent.captions must be templates with '{{}}' for the class name, got "
                             f"{self.captions!r}")
        if not 3 <= self.max_length <= 512:
            raise ValueError(f"latent.max_length must be in [3, 512], got {self.max_length}")


@dataclasses.dataclass(frozen=True)
class Experiment:
    seed: int
    data: DataConfig
    model: Any                 # the config dataclass of model.name's backbone (models/registry.py)
    schedule: ScheduleConfig
    loss: LossConfig
    optim: OptimConfig
    train: TrainConfig
    sample: SampleConfig
    latent: LatentConfig = LatentConfig()
    distill: DistillConfig = DistillConfig()

    SECTIONS = {"data": DataConfig, "model": UNetConfig, "schedule": ScheduleConfig, "loss": LossConfig,
                "optim": OptimConfig, "train": TrainConfig, "sample": SampleConfig, "latent": LatentConfig,
                "distill": DistillConfig}

    @classmethod
    def section_class(cls, name: str, values: Mapping | None = None) -> type:
        """The dataclass of config section `name`; for "model", that of model.name's backbone (a dict `values`)."""
        return config_class(values) if name == "model" else cls.SECTIONS[name]

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Experiment":
        raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
        unknown = set(raw) - set(cls.SECTIONS) - {"seed"}
        if unknown:
            raise ValueError(f"unknown top-level config key(s) {sorted(unknown)}; "
                             f"expected {['seed', *cls.SECTIONS]}")
        name = (raw.get("model") or {}).get("name", "unet")
        if backbone(name).kind != "denoiser":
            raise ValueError(f"model.name={name!r} is an {backbone(name).kind}, not a denoiser "
                             f"{names_of_kind('denoiser')}: train it with its own config (configs/vae.py for 'vae'), "
                             "through train.runs.load_run / diffusion-jax train")
        sections = {name: build_section(name, cls.section_class(name, raw.get(name, {})), raw.get(name, {}),
                                        check_types=False) for name in cls.SECTIONS}
        exp = cls(seed=raw.get("seed", 0), **sections)
        exp.validate()
        return exp

    def validate(self) -> None:
        """Checks that need no data and no compilation; each error names its key."""
        _check_type("seed", self.seed, int)
        for name in self.SECTIONS:
            section = getattr(self, name)
            hints = typing.get_type_hints(type(section))
            for field in dataclasses.fields(section):
                _check_type(f"{name}.{field.name}", getattr(section, field.name), hints[field.name])
        self.data.validate()
        self.model.validate()
        validate_loss(self.loss, self.model.learn_sigma, self.schedule.kind)
        self.latent.validate(self.model.context_dim)
        adapter = self.model.name if backbone(self.model.name).pretrained is not None else None
        m = self.model
        check_distill(self.distill, self.schedule.kind, self.loss.prediction, gamma=self.schedule.gamma,
                      adapter=adapter, init_from=self.train.init_from,
                      guidance_embed_dim=getattr(m, "guidance_embed_dim", None),
                      conditional=getattr(m, "num_classes", None) is not None or getattr(m, "context_dim", None)
                      is not None)
        if self.latent.vae_workdir is not None and self.model.num_classes is not None:
            raise ValueError(f"model.num_classes={self.model.num_classes}: a latent run is conditioned on captions "
                             "(the class name is in the caption); set model.num_classes=None")
        if self.model.image_size != self.data.image_size and self.latent.vae_workdir is None:
            raise ValueError(f"model.image_size={self.model.image_size} differs from "
                             f"data.image_size={self.data.image_size}")
        _positive(self, "schedule.num_timesteps", "train.steps", "train.batch_size", "train.log_every",
                  "train.ckpt_every", "train.keep_checkpoints", "train.sample_num", "train.sample_steps",
                  "sample.steps", "sample.num")
        for key, bound in _BOUNDS.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if not _within(value, bound):
                raise ValueError(f"{key} must be {'in ' if bound[0] in '[(' else ''}{bound}, got {value!r}")
        if self.train.num_devices and self.train.batch_size % self.train.num_devices:
            raise ValueError(f"train.batch_size={self.train.batch_size} is not divisible by "
                             f"train.num_devices={self.train.num_devices}")
        check_schedule(self.schedule.name, self.schedule.num_timesteps, self.schedule.beta_start,
                       self.schedule.beta_end)
        _check_schedule_kind(self.schedule)
        if self.data.name == "pairs" and self.schedule.kind != "flow":
            raise ValueError(f"data.name='pairs' is a reflow coupling, which the flow objective trains on; "
                             f"schedule.kind={self.schedule.kind!r} draws its own noise: set schedule.kind='flow'")
        if self.train.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite={self.train.on_nonfinite!r} is unknown; choose from ('stop', 'skip')")
        if self.optim.decay not in ("constant", "cosine"):
            raise ValueError(f"optim.decay={self.optim.decay!r} is unknown; choose from ('constant', 'cosine')")
        from diffusion_jax.samplers import SAMPLERS, SPACINGS
        from diffusion_jax.samplers.ddpm import VARIANCES

        if self.sample.variance not in VARIANCES:
            raise ValueError(f"sample.variance={self.sample.variance!r} is unknown; choose from {VARIANCES}")
        if self.sample.sampler not in SAMPLERS:
            raise ValueError(f"sample.sampler={self.sample.sampler!r} is unknown; choose from {sorted(SAMPLERS)}")
        if self.schedule.kind != "discrete":
            from diffusion_jax.samplers.grid import DISCRETE_ONLY_SPACINGS

            if self.sample.spacing in DISCRETE_ONLY_SPACINGS:
                raise ValueError(f"sample.spacing={self.sample.spacing!r} selects discrete timesteps; schedule.kind="
                                 f"{self.schedule.kind!r} takes 'karras', 'logsnr', 'uniform', 'quadratic' or 'trailing'")
        if self.sample.spacing not in SPACINGS:
            raise ValueError(f"sample.spacing={self.sample.spacing!r} is unknown; choose from {SPACINGS}")
        for key, steps in (("sample.steps", self.sample.steps), ("train.sample_steps", self.train.sample_steps)):
            if self.schedule.kind == "discrete" and steps > self.schedule.num_timesteps:
                raise ValueError(f"{key}={steps} exceeds schedule.num_timesteps={self.schedule.num_timesteps}")

    def to_dict(self) -> dict:
        return {"seed": self.seed, **{k: dataclasses.asdict(getattr(self, k)) for k in self.SECTIONS}}


def consistency_of(exp: Experiment) -> ConsistencyParam | None:
    """The skip / out parameterization a consistency model's samplers apply (`objectives.distill`), None for any other
    run. The boundary is the clean end of the distillation grid (s_min = 0), or EDM's sigma_min for consistency
    training."""
    if not exp.distill.consistency:
        return None
    s_min = build_schedule(exp.schedule).sigma_min if exp.distill.method == "consistency_training" else 0.0
    return ConsistencyParam(float(s_min), exp.distill.sigma_data)


def takes_w(exp: Experiment) -> bool:
    """Whether the run's network takes the guidance weight w as input (model.guidance_embed_dim: a
    guidance-distilled student)."""
    return getattr(exp.model, "guidance_embed_dim", None) is not None


def sampling_kwargs(exp: Experiment) -> dict:
    """The keywords `inference.sampling.make_sample_fn` takes from a trained run: how to read its output
    (loss.prediction, model.learn_sigma, a consistency model's parameterization), its classes (the null class of
    guidance) and whether the network takes the guidance weight w as input (a guidance-distilled student)."""
    m = exp.model
    return dict(prediction=exp.loss.prediction, learn_sigma=m.learn_sigma, num_classes=m.num_classes,
                consistency=consistency_of(exp), guidance_input=takes_w(exp))


def build_section(name: str, klass, values, *, check_types: bool = True):
    """The dataclass `klass` of config section `name` from a dict: unknown keys are named (with the nearest
    known one), lists become tuples, and (check_types) each value must fit its field's annotation."""
    if not isinstance(values, Mapping):
        raise ValueError(f"config section '{name}' must be a dict of keys, got {values!r}")
    values = dict(values)
    fields = {f.name: f for f in dataclasses.fields(klass)}
    for key in values:
        if key not in fields:
            raise ValueError(f"unknown config key '{name}.{key}'{_suggest(key, fields)}")
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    section = klass(**values)
    if check_types:
        hints = typing.get_type_hints(klass)
        for key in fields:
            _check_type(f"{name}.{key}", getattr(section, key), hints[key])
    return section


# Ranges of numbers, in the notation of the error message ("> 0", ">= 0", "[0, 1)"); types are checked before.
_BOUNDS = {"optim.learning_rate": "> 0", "optim.warmup_steps": ">= 0", "optim.weight_decay": ">= 0",
           "optim.b1": "[0, 1)", "optim.b2": "[0, 1)", "optim.eps": "> 0", "optim.grad_clip": ">= 0",
           "train.ema_decay": "[0, 1)", "train.num_devices": ">= 0", "train.sample_every": ">= 0",
           "sample.eta": ">= 0", "sample.clip_denoised": ">= 0"}


def _within(value, bound: str) -> bool:
    if bound[0] == ">":
        op, limit = bound.split()
        return value > float(limit) if op == ">" else value >= float(limit)
    lo, hi = (float(v) for v in bound[1:-1].split(","))
    return (lo < value if bound[0] == "(" else lo <= value) and (value < hi if bound[-1] == ")" else value <= hi)


def _type_ok(value, hint) -> bool:
    """value fits the dataclass annotation `hint` (bool, int, float (finite; an int will do), str, X | None,
    tuple[X, ...], or a class)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_type_ok(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if hint is int:
        return isinstance(value, (int, np.integer))
    if hint is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    return isinstance(value, hint)


def _check_type(key: str, value, hint) -> None:
    if not _type_ok(value, hint):
        name = hint.__name__ if isinstance(hint, type) else str(hint).replace("os.PathLike", "PathLike")
        finite = " (finite)" if "float" in name else ""
        raise ValueError(f"config key '{key}' expects {name}{finite}, got {value!r}")


def _positive(exp, *keys):
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(exp, section), name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _suggest(key, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {sorted(options)}"


# ----------------------------------------------------------------------------------------------------
# Loading config files and applying overrides
# ----------------------------------------------------------------------------------------------------
def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load `path/to/config.py` or `path/to/config.py:arg` (the arg is passed to get_config)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_diffusion_jax_config_{abs(hash(path))}", path)
    if module_spec is None:
        raise ValueError(f"config file {path!r} is not a Python file (configs are .py files with get_config())")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"config file {path!r} line {e.lineno}: {e.msg}") from e
    except Exception as e:   # the file's own code failed: name the file and the error, not a traceback
        raise ValueError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path!r} defines no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except TypeError as e:
        raise ValueError(f"get_config() of {path!r} rejected the argument {arg!r}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"get_config() of {path!r} returned a {type(config).__name__}, not an "
                         "ml_collections.ConfigDict")
    return config


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a diffusion-jax training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _parse_like(text: str, current: Any, key: str):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"config key '{key}' expects a bool, got {text!r}")
    if isinstance(current, str):
        return text
    if isinstance(current, float) and text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        value = float(text)
        if math.isnan(value):
            raise ValueError(f"config key '{key}' must be a number, got {text!r} (not a number)")
        return value   # infinite: the section's validate() says whether this key allows it
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        example = {"float": " (a number such as 2e-4)", "int": " (a whole number such as 200)"}
        raise ValueError(f"config key '{key}' expects {type(current).__name__}"
                         f"{example.get(type(current).__name__, '')}, got {text!r}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (tuple, list)):
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    elif current is not None and not isinstance(value, type(current)):
        raise ValueError(f"config key '{key}' expects {type(current).__name__}, got {text!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    run_class=None) -> ml_collections.ConfigDict:
    """Apply 'a.b=value' strings (as given on the command line after --config.). A key that the config file leaves
    at its dataclass default may still be set: run_class (default Experiment; an autoencoder run passes
    train.vae.VAERun) names the sections (SECTIONS) and their dataclasses (section_class(name, values))."""
    run_class = run_class or Experiment
    config = copy.deepcopy(config)  # keeps FieldReferences (model.image_size -> data.image_size)
    config = _switch_backbone(config, overrides, run_class)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"config override {item!r} must look like key=value (e.g. train.steps=200)")
        *parents, leaf = key.split(".")
        node, path = config, []
        for part in parents:
            path.append(part)
            if node is config and part not in node and part in run_class.SECTIONS:   # left at defaults
                with config.unlocked():
                    config[part] = ml_collections.ConfigDict()
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(f"unknown config key '{key}': no section '{'.'.join(path)}'"
                                 f"{_suggest(part, node.keys())}")
            node = node[part]
        if leaf in node:
            node[leaf] = _parse_like(text, node[leaf], key)
            continue
        # A key the config file leaves at its dataclass default (e.g. schedule.kind) may still be set.
        fields = ({f.name: f for f in dataclasses.fields(run_class.section_class(parents[0], node.to_dict()))}
                  if len(parents) == 1 and parents[0] in run_class.SECTIONS else {})
        if leaf not in fields:
            raise ValueError(f"unknown config key '{key}'{_suggest(leaf, set(node.keys()) | set(fields))}")
        with node.unlocked():
            node[leaf] = _parse_like(text, fields[leaf].default, key)
    return config


def _switch_backbone(config, overrides: Sequence[str], run_class) -> ml_collections.ConfigDict:
    """With a `model.name=X` override naming another backbone than the config file's, the model section keeps only
    the keys X's config has (image_size, in_channels, num_classes, ... as the file set them) and the rest start at X's
    defaults, so that e.g. --config.model.name=dit works on a U-Net config file; the dropped keys are logged."""
    names = [item.partition("=")[2] for item in overrides if item.partition("=")[0] == "model.name"]
    model = config.get("model") if "model" in config else None
    if not names or model is None or names[-1] == model.get("name", "unet") or "model" not in run_class.SECTIONS:
        return config
    klass = run_class.section_class("model", {"name": names[-1]})
    fields = {f.name for f in dataclasses.fields(klass)}
    dropped = sorted(k for k in model.keys() if k not in fields)
    if dropped:
        log.info("model.name=%s: the config file's model keys %s belong to its %r backbone and are dropped", names[-1],
                 dropped, model.get("name", "unet"))
    with config.unlocked(), model.unlocked():
        for key in dropped:
            del model[key]
    return config


def load_experiment(spec: str, overrides: Sequence[str] = ()) -> tuple[Experiment, ml_collections.ConfigDict]:
    """Config file + overrides -> (validated Experiment, resolved ConfigDict)."""
    config = apply_overrides(load_config_file(spec), overrides)
    return Experiment.from_config(config), config
