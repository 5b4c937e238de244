"""BERT (transformers' `BertModel`) in Flax NNX, e.g. for sentence-transformers' all-MiniLM-L6-v2.

word + position + token-type embeddings -> LayerNorm -> N post-LN layers
(x = LN(x + attn(x)); x = LN(x + ffn(x)), ffn = dense -> gelu -> dense) -> optional pooler
(tanh(dense(h[:, 0]))). `sentence_embedding` is sentence-transformers' mean pooling + L2 normalisation.

    graphdef, params = split_params(BertModel(config, rngs=nnx.Rngs(0)))
    out = jax.jit(make_bert_apply(graphdef))(params, input_ids, attention_mask)
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
class BertConfig:
    """The architecture of a BERT encoder (defaults: bert-base-uncased's, as transformers')."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    add_pooling_layer: bool = True  # BertModel's default; checkpoints saved without a pooler set False

    def __post_init__(self):
        check_activation(self.hidden_act, "BERT")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BERT hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **overrides) -> BertConfig:
        """From a transformers BertConfig dict (config.json); raises ValueError on options not implemented."""
        cfg = dict(cfg)
        unsupported = {"model_type": ("bert", "bert"), "position_embedding_type": ("absolute", "absolute"),
                       "is_decoder": (False, False), "add_cross_attention": (False, False)}
        for key, (want, default) in unsupported.items():
            if cfg.get(key, default) != want:
                raise ValueError(f"BERT config {key}={cfg[key]!r} is not supported (need {want!r})")
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {k: cfg[k] for k in names if cfg.get(k) is not None}
        kwargs.update(overrides)
        return cls(**kwargs)


class BertLayer(nnx.Module):
    """Post-LN encoder layer. Names: ours -> transformers' in convert.BERT_LAYER_NAMES."""

    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        d, eps = c.hidden_size, c.layer_norm_eps
        self.num_heads, self.act = c.num_attention_heads, c.hidden_act
        self.query, self.key, self.value = linear(d, d, rngs), linear(d, d, rngs), linear(d, d, rngs)
        self.attn_out, self.attn_norm = linear(d, d, rngs), layer_norm(d, eps, rngs)
        self.ffn_in, self.ffn_out = linear(d, c.intermediate_size, rngs), linear(c.intermediate_size, d, rngs)
        self.ffn_norm = layer_norm(d, eps, rngs)

    def __call__(self, x: jax.Array, allowed: jax.Array | None) -> jax.Array:
        """x (B, L, D), allowed None or bool (B, 1, 1, L) -> (B, L, D)."""
        h = attention(self.query(x), self.key(x), self.value(x), self.num_heads, allowed)
        x = self.attn_norm(x + self.attn_out(h))
        return self.ffn_norm(x + self.ffn_out(ACTIVATIONS[self.act](self.ffn_in(x))))


class BertModel(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.word_embeddings = embed(c.vocab_size, c.hidden_size, rngs)
        self.position_embeddings = embed(c.max_position_embeddings, c.hidden_size, rngs)
        self.token_type_embeddings = embed(c.type_vocab_size, c.hidden_size, rngs)
        self.embed_norm = layer_norm(c.hidden_size, c.layer_norm_eps, rngs)
        self.layers = nnx.List([BertLayer(c, rngs) for _ in range(c.num_hidden_layers)])
        if c.add_pooling_layer:
            self.pooler = linear(c.hidden_size, c.hidden_size, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> dict[str, jax.Array]:
        """Encode token ids.

        Args:
          input_ids: int (B, L), L <= max_position_embeddings.
          attention_mask: optional (B, L), 1 for real tokens, 0 for padding (masked as keys).
          token_type_ids: optional int (B, L); zeros when absent (as transformers).
        Returns:
          dict with last_hidden_state (B, L, D) and, with a pooler, pooler_output (B, D).
        """
        c = self.config
        input_ids = jnp.asarray(input_ids)
        length = input_ids.shape[1]
        if length > c.max_position_embeddings:
            raise ValueError(f"BERT input length {length} > max_position_embeddings={c.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(jnp.asarray(token_type_ids))
             + self.position_embeddings(jnp.arange(length))[None])
        x = self.embed_norm(x)
        allowed = key_padding_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, allowed)
        out = {"last_hidden_state": x}
        if c.add_pooling_layer:
            out["pooler_output"] = jnp.tanh(self.pooler(x[:, 0]))
        return out


def sentence_embedding(last_hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """sentence-transformers' mean pooling over real tokens, then L2 normalisation.

    last_hidden (B, L, D), attention_mask (B, L) of 1/0 -> (B, D) unit vectors (float32).
    """
    m = jnp.asarray(attention_mask, jnp.float32)[..., None]
    mean = (last_hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def make_bert_apply(graphdef: nnx.GraphDef):
    """apply(params, input_ids (B, L), attention_mask=None, token_type_ids=None) -> dict of BertModel."""

    def apply(params, input_ids, attention_mask=None, token_type_ids=None):
        return nnx.merge(graphdef, params)(input_ids, attention_mask, token_type_ids)

    return apply
