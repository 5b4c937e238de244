"""transformers checkpoints -> text encoder params (pure dicts of float32 arrays); nothing here imports torch.

State dicts may hold numpy arrays, jax arrays or torch tensors, with names as transformers writes them,
with or without the "text_model." (CLIP) / "bert." (BERT) prefix. Linear weights (out, in) become
kernels (in, out); LayerNorm weight -> scale; Embedding weight -> embedding.

    config, graphdef, params = load_clip_text("sd15/text_encoder")   # config.json + model.safetensors
    out = jax.jit(make_clip_apply(graphdef))(params, ids)
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.functional import abstract_params
from diffusion_jax.models.text.bert import BertConfig, BertModel
from diffusion_jax.models.text.clip import CLIPTextConfig, CLIPTextModel
from diffusion_jax.models.text.common import LoadedModel

_PARAM = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Non-persistent buffers that older transformers versions saved; they carry no weights.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
BERT_LAYER_NAMES = {  # ours -> transformers', inside encoder.layer.{i}
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
_BERT_TOP = {"word_embeddings": "embeddings.word_embeddings", "position_embeddings": "embeddings.position_embeddings",
             "token_type_embeddings": "embeddings.token_type_embeddings", "embed_norm": "embeddings.LayerNorm",
             "pooler": "pooler.dense"}
_CLIP_TOP = {"token_embedding": "embeddings.token_embedding", "position_embedding": "embeddings.position_embedding",
             "final_layer_norm": "final_layer_norm", "text_projection": "text_projection"}


def clip_key(path: tuple) -> str:
    """('layers', 0, 'self_attn', 'q_proj', 'kernel') -> 'encoder.layers.0.self_attn.q_proj.weight'."""
    *mods, param = map(str, path)
    mods = ["encoder", *mods] if mods[0] == "layers" else [_CLIP_TOP[mods[0]], *mods[1:]]
    return ".".join(mods + [_PARAM[param]])


def bert_key(path: tuple) -> str:
    """('layers', 0, 'ffn_norm', 'scale') -> 'encoder.layer.0.output.LayerNorm.weight'."""
    *mods, param = map(str, path)
    if mods[0] == "layers":
        mods = ["encoder.layer", mods[1], BERT_LAYER_NAMES[mods[2]]]
    else:
        mods = [_BERT_TOP[mods[0]]]
    return ".".join(mods + [_PARAM[param]])


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def convert_state_dict(state_dict: Mapping[str, Any], abstract: dict, key_fn: Callable[[tuple], str], *,
                       prefix: str, model: str, strict: bool = True,
                       rename: Callable[[str], str] = lambda k: k) -> dict:
    """Map a transformers state_dict onto a pure params dict shaped like `abstract`.

    Args:
      state_dict: transformers names -> arrays / tensors; `prefix` is stripped where present.
      abstract: pure dict of ShapeDtypeStructs (the target structure).
      key_fn: our param path -> transformers name.
      strict: if True, keys the model does not use are an error (buffers like position_ids never are).
      rename: applied to every (prefix-stripped) key, e.g. old LayerNorm gamma/beta -> weight/bias.
    Returns:
      pure dict of float32 jax arrays with the structure of `abstract`.
    Raises:
      ValueError naming every missing key, shape mismatch and (if strict) unused key.
    """
    sd = {}
    for k, v in state_dict.items():
        name = rename(k.removeprefix(prefix))
        if name in sd:
            raise ValueError(f"{model} state_dict has {name!r} both with and without the prefix {prefix!r}")
        sd[name] = v
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    missing, mismatched, values = [], [], []
    for path, leaf in leaves:
        ours = tuple(p.key for p in path)
        key = key_fn(ours)
        if key not in sd:
            missing.append(key)
            continue
        value = _to_numpy(sd[key])
        if ours[-1] == "kernel":
            value = value.T  # Linear (out, in) -> (in, out)
        if value.shape != tuple(leaf.shape):
            mismatched.append(f"{key}: checkpoint {tuple(np.shape(sd[key]))} -> {value.shape}, "
                              f"model expects {tuple(leaf.shape)}")
        values.append(jnp.asarray(value))
    used = {key_fn(tuple(p.key for p in path)) for path, _ in leaves}
    unused = sorted(k for k in sd if k not in used and not k.endswith(_BUFFERS)) if strict else []
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:10]))
    if unused:
        problems.append(f"unexpected keys {unused[:10]}{' ...' if len(unused) > 10 else ''}")
    if problems:
        raise ValueError(f"cannot convert the {model} state_dict: " + " | ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, values)


def _bert_rename(key: str) -> str:
    """TF-era BERT checkpoints name LayerNorm parameters gamma / beta."""
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def convert_clip_text(state_dict: Mapping[str, Any], config: CLIPTextConfig, strict: bool = True):
    """transformers CLIPTextModel(/WithProjection) state_dict -> (graphdef, params) of CLIPTextModel(config)."""
    graphdef, abstract = abstract_params(lambda rngs: CLIPTextModel(config, rngs=rngs))
    params = convert_state_dict(state_dict, abstract, clip_key, prefix="text_model.", model="CLIPTextModel",
                                strict=strict)
    return graphdef, params


def convert_bert(state_dict: Mapping[str, Any], config: BertConfig, strict: bool = True):
    """transformers BertModel state_dict -> (graphdef, params) of BertModel(config)."""
    graphdef, abstract = abstract_params(lambda rngs: BertModel(config, rngs=rngs))
    params = convert_state_dict(state_dict, abstract, bert_key, prefix="bert.", model="BertModel",
                                strict=strict, rename=_bert_rename)
    return graphdef, params


def _read_safetensors(path: str) -> dict:
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="numpy") as f:
        keys = list(f.keys())
        bf16 = [k for k in keys if f.get_slice(k).get_dtype() == "BF16"]  # numpy has no bfloat16
        out.update({k: f.get_tensor(k) for k in keys if k not in bf16})
    if bf16:
        with safe_open(path, framework="flax") as f:
            out.update({k: f.get_tensor(k) for k in bf16})
    return out


def read_checkpoint(directory: str) -> tuple[dict, dict]:
    """(config dict, state_dict) from a transformers folder: config.json + model.safetensors (or its
    sharded index, or pytorch_model.bin, which needs torch).

    Raises FileNotFoundError naming the missing folder / file.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint folder {directory!r} does not exist")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path!r} does not exist (a transformers folder has config.json)")
    with open(config_path) as f:
        config = json.load(f)
    single, index = os.path.join(directory, "model.safetensors"), os.path.join(directory, "model.safetensors.index.json")
    binary = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(single):
        return config, _read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_read_safetensors(os.path.join(directory, shard)))
        return config, state
    if os.path.isfile(binary):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{binary!r} is a PyTorch pickle: reading it needs torch (pip install torch), "
                              "or save the weights as model.safetensors") from e
        return config, torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights in {directory!r}: looked for model.safetensors, "
                            "model.safetensors.index.json and pytorch_model.bin")


def load_clip_text(directory: str, strict: bool = True) -> LoadedModel:
    """A transformers CLIPTextModel / CLIPTextModelWithProjection / CLIPModel folder -> LoadedModel.

    For a full CLIPModel the vision tower is dropped and text_projection kept (text_embeds).
    """
    cfg, state = read_checkpoint(directory)
    config = CLIPTextConfig.from_hf(cfg)
    if cfg.get("model_type") == "clip" or "text_config" in cfg:
        vision = ("vision_model.", "visual_projection.", "logit_scale")
        state = {k: v for k, v in state.items() if not k.startswith(vision)}
    return LoadedModel(config, *convert_clip_text(state, config, strict=strict))


def load_bert(directory: str, strict: bool = True) -> LoadedModel:
    """A transformers BertModel folder -> LoadedModel; the pooler is built only if the checkpoint has one."""
    cfg, state = read_checkpoint(directory)
    has_pooler = any(k.endswith("pooler.dense.weight") for k in state)
    config = BertConfig.from_hf(cfg, add_pooling_layer=has_pooler)
    return LoadedModel(config, *convert_bert(state, config, strict=strict))
