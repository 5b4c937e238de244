"""What every network that adapts a trained U-Net shares (ControlNet, models/controlnet.py; LoRA, models/lora.py):
the bases it can wrap, the base run's model section read from its workdir, and the base's trained params.

    base = base_config(section_or_None, base_workdir)      # UNetConfig | UNetCondBackboneConfig
    params = load_base(base_workdir, fresh_base_params, load_params)
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import jax

from diffusion_jax.models.unet import UNet, UNetConfig
from diffusion_jax.models.unet_cond_backbone import UNetCondBackbone, UNetCondBackboneConfig

BASES = {"unet": (UNetConfig, UNet), "unet_cond": (UNetCondBackboneConfig, UNetCondBackbone)}
BASE_CONFIGS = tuple(c for c, _ in BASES.values())


def base_section(workdir: str) -> dict:
    """The `model` section of the run saved in WORKDIR/config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.base_workdir={workdir!r} has no config.json: train the base model there first")
    with open(path) as f:
        model = json.load(f).get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{path} has no model section")
    return model


def base_config(base, base_workdir: str | None, what: str):
    """model.base as its dataclass: a dict is read into the config of its "name" (default "unet"); None is read
    from base_workdir/config.json; a dataclass passes. `what` names the adapter in errors ("a ControlNet")."""
    if base is None and base_workdir is not None:
        base = base_section(base_workdir)
    if isinstance(base, Mapping):
        base = dict(base)
        name = base.get("name", "unet")
        if name not in BASES:
            raise ValueError(f"model.base.name={name!r}: {what} wraps one of {sorted(BASES)}")
        klass = BASES[name][0]
        unknown = sorted(set(base) - {f.name for f in dataclasses.fields(klass)})
        if unknown:
            raise ValueError(f"unknown config key(s) model.base.{unknown[0]} for a {name!r} base")
        base = klass(**base)
    return base


def check_base(base, what: str) -> None:
    """ValueError naming model.base_workdir / model.base when the base is missing or not a U-Net section."""
    if base is None:
        raise ValueError(f"model.base_workdir is not set: {what} needs the trained base run (its model section and "
                         "EMA params), e.g. --config.model.base_workdir=workdirs/digits")
    if not isinstance(base, BASE_CONFIGS):
        raise ValueError(f"model.base must be the model section of a {sorted(BASES)} run, got {type(base).__name__}")
    base.validate()


class AdaptedConfig:
    """What the config of an adapter (a frozen dataclass with `base`, `base_workdir` and ADAPTER, its name in
    errors) shares: `base` read into its dataclass after init (lists of tuple fields become tuples), and the fields
    every denoiser config answers (models/registry.py), taken from the locked base."""

    ADAPTER = "an adapter"
    TUPLES: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "base", base_config(self.base, self.base_workdir, self.ADAPTER))
        for name in self.TUPLES:
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    image_size = property(lambda self: self.base.image_size)
    in_channels = property(lambda self: self.base.in_channels)
    num_classes = property(lambda self: self.base.num_classes)
    context_dim = property(lambda self: self.base.context_dim)
    learn_sigma = property(lambda self: self.base.learn_sigma)


def load_base(base_workdir: str | None, fresh: dict, load_params) -> dict:
    """The base run's EMA params (`load_params(base_workdir)`), checked against the fresh base params' shapes."""
    if base_workdir is None:
        raise ValueError("model.base_workdir is not set: the adapter trains on top of a trained base run")
    base = load_params(base_workdir)
    want = jax.tree.map(lambda a: (a.shape, a.dtype), fresh)
    got = jax.tree.map(lambda a: (a.shape, a.dtype), base)
    if want != got:
        raise ValueError(f"the params of model.base_workdir={base_workdir!r} do not fit model.base (was the base "
                         "section edited by hand?)")
    return base
