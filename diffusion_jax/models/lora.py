"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on a trained U-Net: every targeted
projection W (a Linear kernel (I, O), or a conv kernel (kh, kw, I, O)) becomes

    W' = W + (alpha / r) A B,      A: (I, r) (conv: (kh, kw, I, r)),  B: (r, O),  B = 0 at initialisation

so the adapted network starts as the base exactly and trains r (I + O) numbers per projection (conv: r (kh kw I + O))
instead of I O. The base stays locked; `merge` folds the products into the base's kernels (a plain base network
again), `unmerge` subtracts them (up to float rounding).

Registered as `model.name = "lora"` (models/registry.py): `model.base` is the base run's model section (read from
`model.base_workdir`/config.json when unset), `model.targets` names the projections by module name (default: the
attention projections, q, k, v, proj_out for a `unet` base and to_q, to_k, to_v, to_out for `unet_cond`, diffusers'
LoRA targets; add conv1, conv2 for the ResBlock convolutions). The train loop locks `base` and trains `adapters`
(the registry hooks `pretrained` / `trainable`). `lora_io` writes and reads the adapters in the safetensors layout
that diffusers' `load_lora_weights` and peft read.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from diffusion_jax.models.adapted import BASES, AdaptedConfig, check_base, load_base
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.models.unet_cond_backbone import UNetCondBackboneConfig

DEFAULT_TARGETS = {"unet": ("q", "k", "v", "proj_out"), "unet_cond": ("to_q", "to_k", "to_v", "to_out")}


@dataclasses.dataclass(frozen=True)
class LoRAConfig(AdaptedConfig):
    """`model` section of `model.name="lora"`; errors name keys as `model.<field>`."""

    name: str = "lora"
    base: UNetConfig | UNetCondBackboneConfig | None = None   # the locked U-Net's model section (a dict is read
    #   into its dataclass); None: read from base_workdir/config.json
    base_workdir: str | None = None          # the trained base run whose EMA params are locked
    rank: int = 4                            # r
    alpha: float = 4.0                       # the update is scaled by alpha / r (peft's lora_alpha)
    targets: tuple[str, ...] = ()            # module names of the adapted projections; (): DEFAULT_TARGETS of the base

    ADAPTER, TUPLES = "LoRA", ("targets",)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def resolved_targets(self) -> tuple[str, ...]:
        return self.targets or DEFAULT_TARGETS[self.base.name]

    def validate(self) -> None:
        if self.name != "lora":
            raise ValueError(f"model.name={self.name!r} does not name this config (lora)")
        check_base(self.base, "LoRA")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"model.rank={self.rank!r} must be a positive int (the rank r of the update A B)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"model.alpha={self.alpha!r} must be a positive finite number")
        if not isinstance(self.targets, tuple) or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"model.targets={self.targets!r} must be a tuple of module names, e.g. ('to_q', 'to_v')")


def module_name(path: tuple) -> str:
    """The last named module of a param path: (..., 'attn1', 'to_out', 0, 'kernel') -> 'to_out'."""
    return [p for p in path[:-1] if isinstance(p, str)][-1]


def target_paths(base_params: dict, targets, base_name: str = "base") -> tuple[tuple, ...]:
    """The paths (pure-dict keys, ending in 'kernel') of the base's Linear / conv kernels whose module name is in
    `targets`, in flattening order; ValueError naming the targets when none matches, listing the names there are."""
    flat = traverse_util.flatten_dict(base_params)
    kernels = [p for p, v in flat.items() if p[-1] == "kernel" and len(v.shape) in (2, 4)]
    paths = tuple(p for p in kernels if module_name(p) in targets)
    missing = sorted(set(targets) - {module_name(p) for p in paths})
    if missing:
        names = sorted({module_name(p) for p in kernels})
        raise ValueError(f"model.targets {missing} match no Linear or conv layer of the {base_name!r} base; its "
                         f"layers are named {names}")
    return paths


class Adapter(nnx.Module):
    """A and B of one projection: lora_A (..., I, r) ~ N(0, 1 / I) (the kernel's fan-in), lora_B (r, O) = 0."""

    def __init__(self, kernel_shape: tuple, rank: int, *, rngs: nnx.Rngs):
        *lead, fan_out = kernel_shape
        fan_in = math.prod(lead)
        self.lora_A = nnx.Param(jax.random.normal(rngs.params(), (*lead, rank), jnp.float32) / math.sqrt(fan_in))
        self.lora_B = nnx.Param(jnp.zeros((rank, fan_out), jnp.float32))


def delta(a, b, scale: float):
    """(alpha / r) A B in the kernel's shape: A (..., I, r) contracted with B (r, O)."""
    return scale * jnp.tensordot(a, b, axes=1)


def merge(base_params: dict, adapters: dict, paths, scale: float, sign: float = 1.0) -> dict:
    """base_params with sign * (alpha / r) A B added to each adapted kernel: `adapters` is {i: {"lora_A", "lora_B"}}
    for paths[i]. sign=-1 unmerges."""
    flat = dict(traverse_util.flatten_dict(base_params))
    for i, path in enumerate(paths):
        w = flat[path]
        flat[path] = w + (sign * delta(adapters[i]["lora_A"], adapters[i]["lora_B"], scale)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def unmerge(merged_params: dict, adapters: dict, paths, scale: float) -> dict:
    """The base params again from merged ones (float rounding aside)."""
    return merge(merged_params, adapters, paths, scale, sign=-1.0)


class LoRAUNet(nnx.Module):
    """The registered backbone: the locked base U-Net (`base`) and one Adapter per targeted kernel (`adapters`, in
    the order of `paths`). Called like the base; the base runs on its kernels with the updates merged in."""

    def __init__(self, config: LoRAConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.base = BASES[config.base.name][1](config.base, rngs=rngs)
        shapes = nnx.to_pure_dict(nnx.state(self.base, nnx.Param))
        self.paths = target_paths(shapes, config.resolved_targets, config.base.name)
        flat = traverse_util.flatten_dict(shapes)
        self.adapters = nnx.List([Adapter(tuple(flat[p].shape), config.rank, rngs=rngs) for p in self.paths])

    def merged_params(self) -> dict:
        """The base's params with every update merged: the plain base network this adapted one equals."""
        base = nnx.to_pure_dict(nnx.state(self.base, nnx.Param))
        adapters = {i: {"lora_A": a.lora_A[...], "lora_B": a.lora_B[...]} for i, a in enumerate(self.adapters)}
        return merge(base, adapters, self.paths, self.config.scale)

    def __call__(self, x, t, y=None, context=None, *, train: bool = False, dropout_key=None, **extra):
        graphdef, _ = nnx.split(self.base, nnx.Param)
        return nnx.merge(graphdef, self.merged_params())(x, t, y, context, train=train, dropout_key=dropout_key,
                                                         **extra)


def trainable(path: tuple) -> bool:
    """Whether the param at `path` is trained: the adapters, not the base."""
    return bool(path) and path[0] == "adapters"


def pretrained(config: LoRAConfig, params: dict, load_params) -> dict:
    """Fresh params with the base locked to the base run's EMA params; the adapters keep their initialisation
    (B = 0: the adapted network is the base exactly)."""
    return dict(params, base=load_base(config.base_workdir, params["base"], load_params))
