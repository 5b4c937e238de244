"""The CLIP text transformer (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`) in Flax NNX.

token + position embeddings -> N pre-LN layers (causal self-attention, MLP with quick_gelu or gelu)
-> final LayerNorm. The pooled output is the final hidden state at the end-of-text token; with a
projection (SDXL's second text encoder, `CLIPTextModelWithProjection`) it is also projected to
`text_embeds`.

Used functionally:

    model = CLIPTextModel(config, rngs=nnx.Rngs(0))
    graphdef, params = split_params(model)            # params: pure dict of arrays
    apply = jax.jit(make_clip_apply(graphdef))
    out = apply(params, input_ids, attention_mask)    # dict of arrays, shapes below
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.text.common import (
    ACTIVATIONS,
    attention,
    check_activation,
    embed,
    key_padding_mask,
    layer_norm,
    linear,
)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture of a CLIP text encoder (defaults: openai/clip-vit-base-patch32's, as transformers').

    eos_token_id selects the pooling rule exactly as transformers does: 2 (configs written before
    transformers PR #24773) pools at argmax(input_ids), which is the end token in CLIP's vocabulary;
    any other value pools at the first position holding eos_token_id.
    """
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None  # set for CLIPTextModelWithProjection (a bias-free D -> P projection)

    def __post_init__(self):
        check_activation(self.hidden_act, "CLIP")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"CLIP eos_token_id={self.eos_token_id!r} is not supported (need one int)")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers config.json dict: a CLIPTextConfig's, or a full CLIPModel's (its text_config).

        A projection (`projection_dim`, giving text_embeds) is built for a CLIPModel and when
        `architectures` names CLIPTextModelWithProjection.
        """
        cfg = dict(cfg)
        projection = None
        if cfg.get("model_type") == "clip" or "text_config" in cfg:
            projection = cfg.get("projection_dim") or 512
            cfg = dict(cfg.get("text_config") or {})
        elif "CLIPTextModelWithProjection" in (cfg.get("architectures") or ()):
            projection = cfg.get("projection_dim") or 512
        if cfg.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"config model_type={cfg['model_type']!r} is not a CLIP text model")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "projection_dim"]
        kwargs = {k: cfg[k] for k in names if cfg.get(k) is not None}
        return cls(**kwargs, projection_dim=projection)


class CLIPAttention(nnx.Module):
    def __init__(self, c: CLIPTextConfig, rngs: nnx.Rngs):
        d = c.hidden_size
        self.num_heads = c.num_attention_heads
        self.q_proj, self.k_proj = linear(d, d, rngs), linear(d, d, rngs)
        self.v_proj, self.out_proj = linear(d, d, rngs), linear(d, d, rngs)

    def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
        """x (B, L, D), allowed bool (B or 1, 1, L, L) -> (B, L, D)."""
        h = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, allowed)
        return self.out_proj(h)


class CLIPMLP(nnx.Module):
    def __init__(self, c: CLIPTextConfig, rngs: nnx.Rngs):
        self.act = c.hidden_act
        self.fc1 = linear(c.hidden_size, c.intermediate_size, rngs)
        self.fc2 = linear(c.intermediate_size, c.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, c: CLIPTextConfig, rngs: nnx.Rngs):
        self.layer_norm1 = layer_norm(c.hidden_size, c.layer_norm_eps, rngs)
        self.self_attn = CLIPAttention(c, rngs)
        self.layer_norm2 = layer_norm(c.hidden_size, c.layer_norm_eps, rngs)
        self.mlp = CLIPMLP(c, rngs)

    def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), allowed)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nnx.Module):
    """CLIP text encoder. Parameter names follow transformers' (the converter maps them one to one)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.token_embedding = embed(c.vocab_size, c.hidden_size, rngs)
        self.position_embedding = embed(c.max_position_embeddings, c.hidden_size, rngs)
        self.layers = nnx.List([CLIPEncoderLayer(c, rngs) for _ in range(c.num_hidden_layers)])
        self.final_layer_norm = layer_norm(c.hidden_size, c.layer_norm_eps, rngs)
        if c.projection_dim is not None:
            self.text_projection = linear(c.hidden_size, c.projection_dim, rngs, use_bias=False)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 hidden_layer: int | None = None) -> dict[str, jax.Array]:
        """Encode token ids.

        Args:
          input_ids: int (B, L), L <= max_position_embeddings.
          attention_mask: optional (B, L), 1 for real tokens and 0 for padding (keys at 0 are masked,
            on top of the causal mask). Stable Diffusion passes none.
          hidden_layer: optional index: also return `hidden_states` = the output of encoder layer
            `hidden_layer` (e.g. -2 for the penultimate layer, "clip skip"), before the final LayerNorm.
        Returns:
          dict with last_hidden_state (B, L, D) (after the final LayerNorm), pooler_output (B, D) (the
          last hidden state at the end token), text_embeds (B, P) when the config has a projection, and
          hidden_states (B, L, D) when hidden_layer is given.
        """
        c = self.config
        input_ids = jnp.asarray(input_ids)
        b, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(f"CLIP input length {length} > max_position_embeddings={c.max_position_embeddings}")
        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]
        allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
        pad = key_padding_mask(attention_mask)
        if pad is not None:
            allowed = allowed & pad
        if hidden_layer is not None and not -len(self.layers) <= hidden_layer < len(self.layers):
            raise ValueError(f"hidden_layer={hidden_layer} is not a layer index of a {len(self.layers)}-layer encoder")
        out = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, allowed)
            if hidden_layer is not None and i == hidden_layer % len(self.layers):
                out["hidden_states"] = x
        x = self.final_layer_norm(x)
        if c.eos_token_id == 2:  # legacy configs: the end token has the largest id in CLIP's vocabulary
            eos = jnp.argmax(input_ids, axis=-1)
        else:  # first occurrence of the end token (the pad token may equal it)
            eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        pooled = x[jnp.arange(b), eos]
        out.update(last_hidden_state=x, pooler_output=pooled)
        if c.projection_dim is not None:
            out["text_embeds"] = self.text_projection(pooled)
        return out


def make_clip_apply(graphdef: nnx.GraphDef, hidden_layer: int | None = None):
    """apply(params, input_ids (B, L), attention_mask=None) -> the dict of `CLIPTextModel.__call__`."""

    def apply(params, input_ids, attention_mask=None):
        return nnx.merge(graphdef, params)(input_ids, attention_mask, hidden_layer=hidden_layer)

    return apply
