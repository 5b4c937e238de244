"""The cross-attention U-Net (models/unet_cond.py), its config and its diffusers converter.

Parity with diffusers' UNet2DConditionModel uses randomly initialised models built locally (no downloads).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from harness import (
    assert_rel_close,
    assert_trees_equal,
    fast_jit,
    meta_model,
    need,
    random_torch_model,
    run_nhwc,
    torch_param_count,
)

from diffusion_jax.models import functional
from diffusion_jax.models.convert_unet_cond import convert_unet_cond, load_unet_cond, unet_cond_graphdef
from diffusion_jax.models.unet_cond import UNetCond, UNetCondConfig

# runwayml / stable-diffusion-v1-5 unet/config.json
SD15 = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SD15_PARAMS = 859_520_964

# The tiny diffusers models of the parity tests: A is SD 1.x-shaped; B flips every option we implement.
TINY_A = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
TINY_B = dict(TINY_A, use_linear_projection=True, attention_head_dim=(2, 4), transformer_layers_per_block=2,
              num_class_embeds=3, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
              mid_block_scale_factor=2.0, center_input_sample=True, upcast_attention=True, time_cond_proj_dim=7,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
RTOL = 1e-4  # parity tolerance, relative to the largest magnitude of the reference output


def test_sd15_config_resolves_heads_as_diffusers():
    """diffusers' `attention_head_dim=8` of SD 1.x is the number of heads (its issue 2011)."""
    config = UNetCondConfig.from_diffusers(SD15)
    assert config == UNetCondConfig()
    assert config.per_block("num_attention_heads") == (8, 8, 8, 8)  # head widths 40, 80, 160, 160
    per_block = UNetCondConfig.from_diffusers({**SD15, "attention_head_dim": [5, 10, 20, 20]})
    assert per_block.num_attention_heads == (5, 10, 20, 20)
    assert UNetCondConfig.from_diffusers({**SD15, "down_block_types": ["UNetResDownBlock2D"] * 4,
                                          "up_block_types": ["UpBlock2D"] * 4}).down_block_types == ("DownBlock2D",) * 4


@pytest.fixture(scope="module")
def abstract():
    """Shape-only UNetCond models of TINY_A and TINY_B (no allocation)."""
    return {name: nnx.eval_shape(lambda cfg=cfg: UNetCond(UNetCondConfig.from_diffusers(cfg), rngs=nnx.Rngs(0)))
            for name, cfg in (("A", TINY_A), ("B", TINY_B))}


def test_functional_split_has_only_params(abstract):
    _, params = functional.split_params(abstract["B"])
    blocks = params["down_blocks"][0]["attentions"][0]["transformer_blocks"]
    assert len(blocks) == 2 and blocks[1]["ff"]["proj"]["kernel"].shape == (32, 256)  # GEGLU: 2 x 4 x 32


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text"), ("encoder_hid_dim", 32),
    ("dual_cross_attention", True), ("attention_type", "gated"), ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("class_embed_type", "timestep"),
    ("only_cross_attention", [True, False, False, False]), ("num_attention_heads", 8), ("act_fn", "gelu"),
    ("time_embedding_type", "fourier"), ("cross_attention_dim", [768, 768, 1024, 1024]),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 4), ("block_out_channels", [320, 640, 1280, 1000]),
    ("layers_per_block", [2, 2]), ("transformer_layers_per_block", [[1, 2]] * 4), ("not_a_diffusers_key", 1)])
def test_from_diffusers_refuses_what_is_not_implemented(key, value):
    with pytest.raises(ValueError, match=key):
        UNetCondConfig.from_diffusers({**SD15, key: value})


def test_call_convention_errors(abstract):
    model, labelled = abstract["A"], abstract["B"]
    x, t, ctx = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2,)), jnp.zeros((2, 3, 16))
    with pytest.raises(ValueError, match="num_class_embeds"):
        model(x, t, jnp.zeros((2,), jnp.int32), ctx)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        model(x, t)
    with pytest.raises(ValueError, match=r"context must be \(2, L, 16\)"):
        model(x, t, None, jnp.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match="pass labels y"):
        labelled(x, t, None, ctx)
    with pytest.raises(ValueError, match=r"time_cond_proj_dim=7\); pass guidance of shape"):
        labelled(x, t, jnp.zeros((2,), jnp.int32), ctx)
    with pytest.raises(ValueError, match="does not take one"):
        model(x, t, None, ctx, guidance=jnp.ones((2,)))


# ---------------------------------------------------------------- parity with diffusers (PyTorch)


@pytest.fixture(scope="module")
def models():
    """{name: (diffusers model, our config, converted params, jitted apply)} for TINY_A and TINY_B."""
    torch, diffusers = need("torch", "diffusers")
    torch.set_num_threads(1)
    out = {}
    for seed, (name, cfg) in enumerate((("A", TINY_A), ("B", TINY_B))):
        # every tensor perturbed, so norm scales / zero biases are exercised too
        ref = random_torch_model(diffusers.UNet2DConditionModel, seed, perturb=0.1, **cfg)
        config = UNetCondConfig.from_diffusers(ref.config)
        params = convert_unet_cond(ref.state_dict(), config)
        out[name] = (ref, config, params, fast_jit(functional.make_apply_fn(unet_cond_graphdef(config))))
    return out


def _inputs(config, shape, seed=1):
    rng = np.random.RandomState(seed)
    x = rng.randn(2, *shape, config.in_channels).astype(np.float32)
    t = np.array([3.0, 917.5], np.float32)
    ctx = rng.randn(2, 5, config.cross_attention_dim).astype(np.float32)
    y = np.array([0, 2], np.int64) if config.num_class_embeds else None
    return x, t, y, ctx


def _guidance(config):
    """(our guidance w (2,), diffusers' timestep_cond: its LCM pipeline's embedding of w - 1) or ({}, {})."""
    if config.time_cond_proj_dim is None:
        return {}, {}
    torch, _ = need("torch", "diffusers")
    from diffusers import LatentConsistencyModelPipeline

    w = np.array([1.0, 7.5], np.float32)
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor(w - 1.0),
                                                                      config.time_cond_proj_dim)
    return {"guidance": jnp.asarray(w)}, {"timestep_cond": emb.numpy()}


@pytest.mark.torch
@pytest.mark.parametrize("name, shape", [("A", (16, 16)), ("A", (15, 10)), ("B", (16, 16))])
def test_parity_with_diffusers(models, name, shape):
    """Same inputs -> same outputs (NCHW <-> NHWC); (15, 10) exercises diffusers' odd-size upsampling."""
    ref, config, params, apply = models[name]
    x, t, y, ctx = _inputs(config, shape)
    ours_w, theirs_w = _guidance(config)       # B: LCM's guidance-conditioned time embedding (time_cond_proj_dim)
    ours = np.asarray(apply(params, x, t, None if y is None else jnp.asarray(y), ctx, **ours_w))
    theirs = run_nhwc(ref, x, t, ctx, class_labels=y, **theirs_w)
    assert ours.shape == theirs.shape == (2, *shape, config.out_channels)
    rel = assert_rel_close(ours, theirs, RTOL, f"UNet2DConditionModel parity {name} {shape}")
    print(f"UNet2DConditionModel parity {name} {shape}: relative error {rel:.2e}")


@pytest.mark.torch
def test_gradients_flow(models):
    _, config, params, _ = models["A"]
    apply = functional.make_apply_fn(unet_cond_graphdef(config))
    x, t, _, ctx = _inputs(config, (8, 8))
    grads = fast_jit(jax.grad(lambda p: jnp.mean(apply(p, x, t, None, ctx) ** 2)))(params)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(params)) and all(np.isfinite(g).all() for g in leaves)
    for blocks in (params, grads):
        assert set(blocks["down_blocks"][0]["attentions"][0]["transformer_blocks"][0]["attn2"]) == {"to_q", "to_k",
                                                                                                   "to_v", "to_out"}
    for block in (grads["down_blocks"][0], grads["up_blocks"][1], grads["mid_block"]):
        attn2 = block["attentions"][0]["transformer_blocks"][0]["attn2"]
        for g in (attn2["to_k"]["kernel"], attn2["to_v"]["kernel"], attn2["to_q"]["kernel"]):
            assert np.abs(np.asarray(g)).max() > 0


@pytest.mark.torch
def test_converter_names_missing_unexpected_and_misshapen_keys(models):
    ref, config, _, _ = models["A"]
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    key = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
    with pytest.raises(ValueError, match="missing.*ff.net.0.proj.weight"):
        convert_unet_cond({k: v for k, v in sd.items() if k != key}, config)
    with pytest.raises(ValueError, match=r"attn2.to_k.weight': shape \(64, 12\) converts to \(12, 64\).*needs \(16, 64\)"):
        convert_unet_cond({**sd, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight":
                           np.zeros((64, 12), np.float32)}, config)
    with pytest.raises(ValueError, match="does not use.*encoder_hid_proj.weight"):
        convert_unet_cond({**sd, "encoder_hid_proj.weight": np.zeros((16, 8), np.float32)}, config)


@pytest.mark.torch
def test_load_from_folder(models, tmp_path):
    ref, config, params, _ = models["B"]
    ref.save_pretrained(tmp_path / "pipe" / "unet")  # config.json + diffusion_pytorch_model.safetensors
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded_config, loaded = load_unet_cond(tmp_path / "pipe")  # a pipeline folder: finds unet/
    assert loaded_config == config
    assert_trees_equal(loaded, params)
    with open(tmp_path / "pipe" / "unet" / "config.json") as f:
        assert UNetCondConfig.from_diffusers(json.load(f), dtype="bfloat16").dtype == "bfloat16"


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_unet_cond(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet_cond(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY_A))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_unet_cond(tmp_path)
    assert not os.path.exists(tmp_path / "diffusion_pytorch_model.bin")


@pytest.mark.torch
def test_sd15_parameter_count_matches_diffusers():
    _, diffusers = need("torch", "diffusers")
    ref = meta_model(diffusers.UNet2DConditionModel, **{k: v for k, v in SD15.items() if not k.startswith("_")})
    assert torch_param_count(ref) == SD15_PARAMS
    assert UNetCondConfig.from_diffusers(ref.config) == UNetCondConfig()
