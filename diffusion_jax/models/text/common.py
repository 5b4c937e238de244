"""Pieces shared by the text encoders: activations by transformers' names, masked multi-head attention.

Shapes: B batch, L sequence length, D hidden size, H heads, D = H * head_dim.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),   # CLIP's original activation
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),     # erf form (torch.nn.functional.gelu)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def check_activation(name: str, model: str) -> str:
    """Return `name` if implemented, else raise ValueError naming it and the supported ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{model} config hidden_act={name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return name


class LoadedModel(NamedTuple):
    """What the loaders return: the typed config, the NNX graphdef and the params (pure dict of arrays).

    Unpacks as `config, graphdef, params = load_bert(path)`.
    """
    config: object
    graphdef: nnx.GraphDef
    params: dict


def linear(din: int, dout: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    """Linear layer with transformers' initialisation scale (normal, std 0.02); kernel (din, dout)."""
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)


def embed(num: int, dim: int, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(num, dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, allowed: jax.Array | None) -> jax.Array:
    """Scaled dot-product attention over heads.

    Args:
      q, k, v: (B, L, D) projected queries / keys / values.
      num_heads: H; each head has D // H channels.
      allowed: None or bool, broadcastable to (B, H, L_q, L_k): True where a query may attend to a key.
    Returns:
      (B, L, D). A query with no allowed key attends uniformly (finite, no NaN), as additive-mask code does.
    """
    b, length, d = q.shape
    q, k, v = (x.reshape(b, x.shape[1], num_heads, d // num_heads) for x in (q, k, v))
    scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) * (d // num_heads) ** -0.5
    scores = scores.astype(jnp.float32)
    if allowed is not None:
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, length, d)


def key_padding_mask(attention_mask: jax.Array | None) -> jax.Array | None:
    """(B, L) 1/0 (or bool) mask of real tokens -> (B, 1, 1, L) bool mask over keys, or None."""
    if attention_mask is None:
        return None
    return (jnp.asarray(attention_mask) != 0)[:, None, None, :]
