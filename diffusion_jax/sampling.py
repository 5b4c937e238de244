"""From a trained network to samples: wraps the module into a `denoise_fn(x, t)` and jits a sampler end
to end. Samplers themselves (diffusion_jax.samplers) never see a module or a config."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.models.functional import make_apply_fn
from diffusion_jax.samplers import SAMPLERS
from diffusion_jax.schedules import DiscreteSchedule


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """What to run: a sampler name from SAMPLERS and its options (all static for jit)."""
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: str = "leading"
    variance: str = "fixed_small"
    clip_denoised: float | None = 1.0

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sample.sampler={self.sampler!r} is unknown; choose from {sorted(SAMPLERS)}")


def make_sample_fn(graphdef, schedule: DiscreteSchedule, spec: SamplerSpec, shape: tuple[int, ...], *,
                   prediction: str = "eps", learn_sigma: bool = False) -> Callable:
    """Returns jitted `sample(params, key, y=None) -> (images (N,H,W,C), nfe)`.

    y: (N,) int32 labels for a class-conditional model (None for unconditional).
    """
    spec.validate()
    apply = make_apply_fn(graphdef)
    channels = shape[-1]
    keep_variance = learn_sigma and spec.sampler == "ddpm" and spec.variance == "learned"
    if spec.variance == "learned" and not learn_sigma and spec.sampler == "ddpm":
        raise ValueError("sample.variance='learned' needs a model trained with model.learn_sigma=True")
    kwargs = dict(steps=spec.steps, prediction=prediction, spacing=spec.spacing,
                  clip_denoised=spec.clip_denoised or None)
    if spec.sampler == "ddim":
        kwargs["eta"] = spec.eta
    if spec.sampler == "ddpm":
        kwargs["variance"] = spec.variance
    sampler = SAMPLERS[spec.sampler]

    def sample(params, key, y=None):
        def denoise_fn(x, t):
            out = apply(params, x, t, y=y)
            return out if keep_variance else out[..., :channels]

        x, info = sampler(denoise_fn, schedule, key, shape, **kwargs)
        return x, info["nfe"]

    jitted = jax.jit(sample)

    def run(params, key, y=None):
        x, nfe = jitted(params, key, y)
        return x, int(nfe)

    return run


def class_labels(num: int, num_classes: int | None):
    """Labels 0, 1, ..., num_classes-1, 0, 1, ... for a grid (None when unconditional)."""
    return None if num_classes is None else jnp.arange(num, dtype=jnp.int32) % num_classes
