"""The two types every diffusers scheduler builder shares (`diffusers_schedulers`): `Keys`, a config read with
diffusers' defaults that records which keys were read, and `Plan`, what the config does in our terms."""
from __future__ import annotations

import dataclasses
import math

from diffusion_jax.samplers.grid import Grid
from diffusion_jax.samplers.wrapper import Threshold


@dataclasses.dataclass
class Plan:
    """What a scheduler config does, in our terms: solver `sampler` with `options` on `grid`; the network output
    read as `prediction`, x0_hat clipped / thresholded; x_T = noise_scale z in VP coordinates; the result
    multiplied by out_scale (diffusers' sigma schedulers return x / alpha of their last level)."""

    sampler: str
    options: dict
    grid: Grid
    prediction: str
    clip_denoised: float | None = None
    threshold: Threshold | None = None
    rederive_eps: bool = True
    noise_scale: float = 1.0
    out_scale: float = 1.0
    learned_variance: bool = False
    edm_sigma_data: float | None = None    # an EDM scheduler: the network's EDM preconditioning has this sigma_data
    lcm: tuple[float, float] | None = None  # LCMScheduler: (timestep_scaling, sigma_data) of consistency.lcm_boundary
    extra: dict = dataclasses.field(default_factory=dict)    # solver arguments that are not options (half_grid)


class Keys:
    """A scheduler config with diffusers' defaults, recording which keys were read."""

    def __init__(self, cls: str, cfg: dict, defaults: dict):
        self.cls, self.cfg, self.defaults, self.read = cls, cfg, defaults, set()
        self.where = f"scheduler config {cls}: "

    def __getitem__(self, key):
        self.read.add(key)
        return self.cfg.get(key, self.defaults[key])

    def get(self, key, default=None):
        return self[key] if key in self.defaults else default

    def bad(self, key, why: str) -> ValueError:
        return ValueError(f"{self.where}{key}={self.cfg.get(key, self.defaults.get(key))!r} {why}")

    def choice(self, key, options):
        v = self[key]
        if v not in options:
            raise self.bad(key, f"is not supported; one of {tuple(options)}")
        return v

    def int(self, key, lo: int = 0) -> int:
        v = self[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < lo:
            raise self.bad(key, f"must be an int >= {lo}")
        return int(v)

    def number(self, key) -> float:
        v = self[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise self.bad(key, "must be a positive number")
        return float(v)

    def flag(self, key) -> bool:
        v = self[key]
        if not isinstance(v, bool):
            raise self.bad(key, "must be true or false")
        return v

    def only(self, key, allowed, why: str):
        """Refuse every value but `allowed` (a tuple), saying why."""
        v = self[key]
        if v not in allowed:
            raise self.bad(key, why)
        return v
