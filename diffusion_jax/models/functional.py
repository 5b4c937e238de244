"""Using an NNX module functionally: split once, pass plain pytrees of arrays through `jax.jit`.

`params` everywhere in the library is the pure nested dict of the model's nnx.Param values
(`nnx.to_pure_dict`), so optax, orbax and the sharding code see ordinary pytrees of arrays.
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx


def split_params(model: nnx.Module):
    """model -> (graphdef, params) with params a pure dict of arrays; the model must hold only Params."""
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    leftovers = [leaf for state in rest for leaf in jax.tree.leaves(state)]
    if leftovers:
        raise ValueError(f"{type(model).__name__} holds non-Param state; it cannot be used functionally")
    return graphdef, nnx.to_pure_dict(params)


def abstract_params(make_model: Callable[[nnx.Rngs], nnx.Module]):
    """(graphdef, params as ShapeDtypeStructs) without allocating anything."""
    model = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def make_apply_fn(graphdef) -> Callable:
    """apply(params, x, t, y=None, context=None, train=False, dropout_key=None, **extra) -> network output; `extra`
    are keywords of a backbone that takes more (a ControlNet's control, conditioning_scale, guess_mode)."""

    def apply(params, x, t, y=None, context=None, train=False, dropout_key=None, **extra):
        model = nnx.merge(graphdef, params)
        return model(x, t, y, context, train=train, dropout_key=dropout_key, **extra)

    return apply


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
