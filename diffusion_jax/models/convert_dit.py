"""Convert a diffusers `DiTTransformer2DModel`, or a `Transformer2DModel` on patches with norm_type "ada_norm_zero"
(the class facebook/DiT-XL-2-256's transformer/ names: the same modules), into `DiT` params.

diffusers' layout differs from DiT's in names and in one duplication: every block's AdaLayerNormZero carries its own
copy of the timestep / label embedder (the same weights, as its conversion script writes them); we keep one and
refuse a state_dict whose copies differ. q, k and v are separate Linears there, one qkv Linear here. Numerics:
diffusers' timestep sinusoids use freq_shift 1 and its MLP-branch LayerNorm eps is the config's norm_eps (1e-5 by
default), both set on the DiTConfig. A label table without the null row (class_dropout_prob 0) gets a zero row.

    config = dit_config_from_diffusers(json.load(open("transformer/config.json")))
    params = convert_dit(state_dict, config)            # pure dict, for nnx.merge with DiT(config)'s graphdef
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusion_jax.models.convert_unet_cond import abstract_flat, map_state_dict
from diffusion_jax.models.dit import DiT, DiTConfig, sincos_pos_embed
from diffusion_jax.models.weights_io import to_numpy

# diffusers options DiT implements at one value: key -> (accepted values, diffusers default)
_ONLY = {"norm_type": (("ada_norm_zero",), "ada_norm_zero"),
         "activation_fn": (("gelu-approximate",), "gelu-approximate"), "attention_bias": ((True,), True),
         "norm_elementwise_affine": ((False,), False), "dropout": ((0.0, 0), 0.0)}
_NEUTRAL = ("norm_num_groups", "upcast_attention")   # unused by DiTTransformer2DModel's blocks / float32 here
# Transformer2DModel: its defaults of the keys above (it is a text-to-image transformer by default), and its other
# keys at the values of its DiT path (patches, no cross-attention); use_linear_projection is read only by its
# continuous-input path
_T2D_DEFAULTS = {"norm_type": "layer_norm", "activation_fn": "geglu", "attention_bias": False,
                 "norm_elementwise_affine": True, "dropout": 0.0}
_T2D_DIT = {"cross_attention_dim": None, "num_vector_embeds": None, "only_cross_attention": False,
            "double_self_attention": False, "attention_type": "default", "caption_channels": None,
            "use_additional_conditions": None}


def dit_config_from_diffusers(cfg: Mapping[str, Any], **overrides) -> DiTConfig:
    """The DiTConfig of a DiTTransformer2DModel (or DiT-style Transformer2DModel, by its "_class_name") config.json;
    ValueError naming an option DiT does not implement."""
    cls = dict(cfg).get("_class_name", "DiTTransformer2DModel")
    cfg = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    defaults = {key: default for key, (_, default) in _ONLY.items()}
    if cls == "Transformer2DModel":
        cfg = _transformer_2d_as_dit(cfg)
        defaults.update(_T2D_DEFAULTS)
    elif cls != "DiTTransformer2DModel":
        raise ValueError(f"diffusers class {cls!r} is not a DiT (DiTTransformer2DModel, or Transformer2DModel with "
                         "patch_size and norm_type 'ada_norm_zero')")
    for key, (allowed, _) in _ONLY.items():
        value = cfg.get(key, defaults[key])
        if value not in allowed:
            raise ValueError(f"diffusers config {key}={value!r} is not supported (DiT implements {allowed})"
                             + ("" if key in cfg else f"; {cls}'s default, set it in the config"))
    known = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "sample_size",
             "patch_size", "num_embeds_ada_norm", "norm_eps", *_ONLY, *_NEUTRAL}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"diffusers config keys {unknown} are not known to dit_config_from_diffusers")
    heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
    in_ch = cfg.get("in_channels", 4)
    kwargs = dict(image_size=cfg.get("sample_size", 32), in_channels=in_ch,
                  out_channels=cfg.get("out_channels") or in_ch, patch_size=cfg.get("patch_size", 2),
                  hidden_size=heads * head_dim, depth=cfg.get("num_layers", 28),
                  num_heads=heads, num_classes=cfg.get("num_embeds_ada_norm", 1000), freq_shift=1.0,
                  mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)))
    config = DiTConfig(**{**kwargs, **overrides})
    config.validate()
    return config


def _transformer_2d_as_dit(cfg: dict) -> dict:
    """A Transformer2DModel config without the keys of its non-DiT paths, which must be at their DiT values."""
    if cfg.get("patch_size") is None:
        raise ValueError("a Transformer2DModel without patch_size reads continuous or vector-quantized inputs, not "
                         "DiT's patches")
    for key, want in _T2D_DIT.items():
        if (cfg.get(key, want) or None) != (want or None):
            raise ValueError(f"Transformer2DModel {key}={cfg[key]!r} is not DiT's ({want!r}): DiT implements the "
                             "class-conditional patch transformer without cross-attention")
    scale = cfg.get("interpolation_scale") or max(int(cfg.get("sample_size") or 0) // 64, 1)
    if scale != 1:
        raise ValueError(f"Transformer2DModel interpolation_scale {scale} (sample_size {cfg.get('sample_size')}) is "
                         "not supported: DiT's sin-cos positions are on the unscaled patch grid")
    drop = set(_T2D_DIT) | {"use_linear_projection", "interpolation_scale"}
    return {k: v for k, v in cfg.items() if k not in drop}


def _diffusers_key(path: tuple) -> str | tuple:
    """Our param path -> its diffusers key (qkv: the three keys it is concatenated from)."""
    *mods, param = path
    name = {"kernel": "weight", "bias": "bias", "embedding": "weight"}[param]
    if mods[0] == "blocks":
        i, mod = mods[1], mods[2]
        pre = f"transformer_blocks.{i}."
        if mod == "qkv":
            return tuple(pre + f"attn1.to_{c}.{name}" for c in "qkv")
        return pre + {"proj": "attn1.to_out.0", "fc1": "ff.net.0.proj", "fc2": "ff.net.2", "ada": "norm1.linear"}[mod] \
            + f".{name}"
    emb = "transformer_blocks.0.norm1.emb."
    return {"patch": "pos_embed.proj", "time_1": emb + "timestep_embedder.linear_1",
            "time_2": emb + "timestep_embedder.linear_2", "label": emb + "class_embedder.embedding_table",
            "final_ada": "proj_out_1", "final": "proj_out_2"}[mods[0]] + f".{name}"


def convert_dit(state_dict: Mapping[str, Any], config: DiTConfig) -> dict:
    """The params (pure dict) of `DiT(config)` from a diffusers DiTTransformer2DModel state_dict (module doc)."""
    sd = {k: to_numpy(v) for k, v in state_dict.items()}
    for key in [k for k in sd if ".norm1.emb." in k and not k.startswith("transformer_blocks.0.")]:
        first = "transformer_blocks.0." + key.split(".", 2)[2]
        if first not in sd or not np.array_equal(sd[key], sd[first]):
            raise ValueError(f"diffusers {key!r} differs from {first!r}: DiT shares one timestep / label embedder")
        del sd[key]
    pos = sd.pop("pos_embed.pos_embed", None)      # a buffer some versions save: it must be the 2-D sin-cos one
    if pos is not None and not np.allclose(pos.reshape(-1, config.hidden_size),
                                           sincos_pos_embed(config.hidden_size, config.grid_size), atol=1e-5):
        raise ValueError("diffusers 'pos_embed.pos_embed' is not the 2-D sin-cos embedding of this grid")
    table = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    if table in sd and config.num_classes is not None and sd[table].shape[0] == config.num_classes:
        sd[table] = np.concatenate([sd[table], np.zeros_like(sd[table][:1])])     # the null class, as UNet's
    for path, _ in abstract_flat(DiT, config)[1]:
        key = _diffusers_key(path)
        if isinstance(key, tuple) and all(k in sd for k in key):
            sd["/".join(key)] = np.concatenate([sd.pop(k) for k in key], axis=0)   # (3D, D) / (3D,): q, k, v
    return map_state_dict(sd, abstract_flat(DiT, config)[1],
                          lambda p: "/".join(k) if isinstance(k := _diffusers_key(p), tuple) else k, f"DiT({config})")
