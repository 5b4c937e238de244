"""Tests of the DDPM / ADM U-Net: pinned size, parity with diffusers, functional use, validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params
from flax import nnx
from harness import meta_model, need, random_torch_model, run_nhwc, torch_param_count

from diffusion_jax.models import UNet, UNetConfig, convert_diffusers_unet, unet_config_from_diffusers
from diffusion_jax.models.export_diffusers import unet2d_config

DDPM_CIFAR10_PARAMS = 35_746_307  # diffusers UNet2DModel for google/ddpm-cifar10-32

# google/ddpm-cifar10-32 unet/config.json (the keys that matter).
DDPM_CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6, norm_num_groups=32,
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional")

# Two small models: TINY (2 levels, jitted) and MINI (1 level, also run eagerly / really initialised).
TINY = UNetConfig(image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, num_groups=8, dropout=0.1,
                  num_classes=3, context_dim=6, learn_sigma=True)
MINI = UNetConfig(image_size=4, channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(4,),
                  num_heads=2, num_groups=4, num_classes=2, context_dim=3)


def n_params(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def make_apply(graphdef):
    """Functional apply with a fixed signature, so train=False/True are the only two compiles."""
    def apply(params, x, t, y, context, key, train=False):
        return nnx.merge(graphdef, params)(x, t, y, context, train=train, dropout_key=key)
    return jax.jit(apply, static_argnames="train")


@pytest.fixture(scope="module")
def tiny():
    graphdef, params = random_params(TINY)
    rng = np.random.RandomState(0)
    inputs = (rng.randn(2, 8, 8, 3).astype(np.float32), np.array([0.0, 999.0], np.float32),
              np.array([1, 3], np.int32), rng.randn(2, 5, 6).astype(np.float32))
    return graphdef, params, make_apply(graphdef), inputs


@pytest.fixture(scope="module")
def mini():
    graphdef, params = random_params(MINI, seed=1)
    rng = np.random.RandomState(1)
    inputs = (rng.randn(2, 4, 4, 3).astype(np.float32), np.array([5.0, 250.5], np.float32),
              np.array([MINI.num_classes] * 2, np.int32), rng.randn(2, 7, 3).astype(np.float32))
    return graphdef, params, make_apply(graphdef), inputs


def test_ddpm_cifar10_parameter_count():
    abstract = nnx.eval_shape(lambda: UNet(UNetConfig(), rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    assert n_params(params) == DDPM_CIFAR10_PARAMS
    assert not jax.tree.leaves(rest)
    assert unet_config_from_diffusers(DDPM_CIFAR10_DIFFUSERS, dropout=0.1) == UNetConfig(out_channels=3)


@pytest.mark.torch
def test_ddpm_cifar10_parameter_count_matches_diffusers():
    _, diffusers = need("torch", "diffusers")
    ref = meta_model(diffusers.UNet2DModel, **DDPM_CIFAR10_DIFFUSERS)  # shapes only, no 36M-parameter init
    assert torch_param_count(ref) == DDPM_CIFAR10_PARAMS


@pytest.mark.torch
def test_parity_with_diffusers():
    """Random diffusers UNet2DModel -> convert -> same outputs (NCHW <-> NHWC)."""
    _, diffusers = need("torch", "diffusers")
    ref = random_torch_model(  # every tensor perturbed, so norm scales / zero biases are exercised too
        diffusers.UNet2DModel, seed=0, perturb=0.1,
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=32, num_class_embeds=4,
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)
    config = unet_config_from_diffusers(ref.config)
    assert (config.num_heads, config.attention_resolutions, config.num_classes) == (2, (8,), 4)
    params = convert_diffusers_unet(ref.state_dict(), config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.RandomState(1)
    x = rng.randn(2, 16, 16, 3).astype(np.float32)
    t = np.array([3.0, 517.5], np.float32)
    y = np.array([0, 3], np.int64)
    ours = jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y))(params, x, t, y)
    out = run_nhwc(ref, x, t, class_labels=y)
    np.testing.assert_allclose(np.asarray(ours), out, atol=1e-4, rtol=1e-4)
    # The appended null-class row is zero: y=None equals "no class embedding".
    assert np.all(np.asarray(params["class_embed"]["embedding"][...][-1]) == 0)


@pytest.mark.torch
@pytest.mark.parametrize("options", [
    {},   # diffusers' defaults: flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, norm_eps=1e-5
    dict(flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6),   # DDPM (ddpm-cifar10-32)
    dict(flip_sin_to_cos=True, freq_shift=1, downsample_padding=0, norm_eps=1e-3),
    dict(flip_sin_to_cos=False, freq_shift=0, downsample_padding=1, norm_eps=1e-5),
    dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=2),              # ADM's scale-shift norm
    dict(act_fn="mish", center_input_sample=True),
    dict(act_fn="gelu", mid_block_scale_factor=1.41421356),                           # score_sde's mid-block scale
    dict(add_attention=False, act_fn="swish"),
    dict(attention_head_dim=4),                                                        # 4 and 8 heads: per level
    dict(attention_head_dim=None, attn_norm_num_groups=8),
    dict(down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),     # resampling ResnetBlock2Ds
         up_block_types=("AttnUpBlock2D", "UpBlock2D"), downsample_type="resnet", upsample_type="resnet"),
    dict(down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D"), up_block_types=("ResnetUpsampleBlock2D",
         "UpBlock2D"), add_attention=False, resnet_time_scale_shift="scale_shift"),
])
def test_unet2dmodel_options_convert_with_parity(options):
    """A diffusers UNet2DModel at its defaults (what diffusers' unconditional training example saves) and the
    variants of the time embedding, downsampling padding, norm epsilon, activation, scale-shift norm, input
    centering, middle block (scale, attention, its norm groups) and per-level head counts convert and agree, and
    export back to the same config."""
    _, diffusers = need("torch", "diffusers")
    blocks = {"down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
              "attention_head_dim": 8}
    ref = random_torch_model(
        diffusers.UNet2DModel, seed=2, perturb=0.1, sample_size=8, in_channels=1, out_channels=1,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, **{**blocks, **options})
    config = unet_config_from_diffusers(ref.config)
    want = {"flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "norm_eps": 1e-5} | options
    structure = {k: want.pop(k) for k in (*blocks, "downsample_type", "upsample_type") if k in want}
    if "ResnetDownsampleBlock2D" in structure.get("down_block_types", ()):   # resampling ResnetBlock2Ds
        assert config.resblock == "biggan" and not config.resample_shortcut
        want.pop("downsample_padding")                                      # no stride-2 conv to pad
    assert {k: getattr(config, k) for k in want} == want
    exported = unet2d_config(config)
    assert {k: tuple(exported[k]) if k.endswith("block_types") else exported[k] for k in options} == options
    params = convert_diffusers_unet(ref.state_dict(), config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))), nnx.Param)
    x = np.random.RandomState(3).randn(2, 8, 8, 1).astype(np.float32)
    t = np.array([7.0, 801.0], np.float32)
    ours = nnx.merge(graphdef, params)(x, t)
    out = run_nhwc(ref, x, t)
    np.testing.assert_allclose(np.asarray(ours), out, atol=1e-4, rtol=1e-4)


NCSNPP_BLOCKS = dict(sample_size=8, block_out_channels=(128, 256), norm_num_groups=32, time_embedding_type="fourier",
                     mid_block_scale_factor=1.41421356237, norm_eps=1e-6, attention_head_dim=None,
                     down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                     up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"))


@pytest.mark.torch
@pytest.mark.parametrize("options", [
    dict(time_embedding_type="fourier"),                  # GaussianFourierProjection of log(sigma), output / sigma
    dict(class_embed_type="timestep", num_class_embeds=5),   # y embedded as t is (num_class_embeds unused)
    dict(class_embed_type="identity"),                    # y (B, 4C) added to the time embedding
    NCSNPP_BLOCKS,                                        # google/ncsnpp-*: image pyramids, FIR ResnetBlock2Ds
    {**NCSNPP_BLOCKS, "block_out_channels": (128, 128, 256), "attention_head_dim": 64, "layers_per_block": 1,
     "down_block_types": ("AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),
     "up_block_types": ("SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D"),
     "resnet_time_scale_shift": "scale_shift",
     "attn_norm_num_groups": 32, "act_fn": "mish"},
], ids=["fourier", "class_timestep", "class_identity", "ncsnpp", "ncsnpp_3_levels"])
def test_unet2dmodel_ncsnpp_and_class_embeddings_convert_with_parity(options):
    """UNet2DModel's Fourier time embedding (W from the weights), class_embed_type "timestep" / "identity" and the
    NCSN++ blocks (Skip*Block2D: input / output image pyramids, FIR-resampling ResnetBlock2Ds, one attention per
    up level) convert and agree (relative to the output's scale, which the division by sigma stretches); the export
    refuses them by name, as it does not write them."""
    _, diffusers = need("torch", "diffusers")
    kw = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": (16, 32),
          "layers_per_block": 1, "norm_num_groups": 4, "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
          "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 8, **options}
    ref = random_torch_model(diffusers.UNet2DModel, seed=4, perturb=0.1, **kw)
    config = unet_config_from_diffusers(ref.config, ref.state_dict())
    params = convert_diffusers_unet(ref.state_dict(), config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.RandomState(5)
    x = rng.randn(2, 8, 8, 3).astype(np.float32)
    t = np.array([0.05, 30.0], np.float32)                  # noise levels (> 0: the Fourier embedding takes a log)
    y = {"timestep": np.array([0.5, 3.0], np.float32), "identity": rng.randn(2, 64).astype(np.float32)}.get(
        options.get("class_embed_type"))
    ours = np.asarray(jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y))(params, x, t, y))
    out = run_nhwc(ref, x, t, class_labels=y)
    for i in range(2):
        assert np.abs(ours[i] - out[i]).max() <= 1e-4 * np.abs(out[i]).max()
    with pytest.raises(ValueError, match="no diffusers UNet2DModel counterpart that the export writes"):
        unet2d_config(config)


def test_converter_rejects_mismatches():
    with pytest.raises(ValueError, match="model.act_fn='relu' must be one of"):
        unet_config_from_diffusers({**DDPM_CIFAR10_DIFFUSERS, "act_fn": "relu"})
    with pytest.raises(ValueError, match="attention without GroupNorm"):
        unet_config_from_diffusers({**DDPM_CIFAR10_DIFFUSERS, "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ValueError, match="time_embedding_type='learned' is not supported"):
        unet_config_from_diffusers({**DDPM_CIFAR10_DIFFUSERS, "time_embedding_type": "learned"})
    with pytest.raises(ValueError, match="'time_proj.weight'.*pass the state_dict"):
        unet_config_from_diffusers({**DDPM_CIFAR10_DIFFUSERS, "time_embedding_type": "fourier"})
    with pytest.raises(ValueError, match=r"time_proj.weight' has shape \(64,\), need \(128,\)"):
        unet_config_from_diffusers({**DDPM_CIFAR10_DIFFUSERS, "time_embedding_type": "fourier"},
                                   {"time_proj.weight": np.zeros(64)})
    with pytest.raises(ValueError, match="class_embed_type='projection' is not supported"):
        unet_config_from_diffusers({**DDPM_CIFAR10_DIFFUSERS, "class_embed_type": "projection"})
    ncsnpp = {**DDPM_CIFAR10_DIFFUSERS, **NCSNPP_BLOCKS, "time_embedding_type": "positional"}
    assert unet_config_from_diffusers(ncsnpp).skip_pyramid
    with pytest.raises(ValueError, match=r"mix Skip\*Block2D \(NCSN\+\+\) with other block types"):
        unet_config_from_diffusers({**ncsnpp, "down_block_types": ("DownBlock2D", "AttnSkipDownBlock2D")})
    with pytest.raises(ValueError, match=r"norm_num_groups=32 and every block_out_channels >= 128.*\[64, 128\]"):
        unet_config_from_diffusers({**ncsnpp, "block_out_channels": (64, 128)})
    with pytest.raises(ValueError, match="3-channel image pyramids; in_channels=1"):
        unet_config_from_diffusers({**ncsnpp, "in_channels": 1})
    with pytest.raises(ValueError, match="model.skip_rescale=False: diffusers' Skip"):
        convert_diffusers_unet({}, dataclasses.replace(unet_config_from_diffusers(ncsnpp), skip_rescale=False))
    with pytest.raises(ValueError, match="model.downsample_padding=2 must be 0"):
        unet_config_from_diffusers({**DDPM_CIFAR10_DIFFUSERS, "downsample_padding": 2})
    with pytest.raises(ValueError, match="cross-attention"):
        convert_diffusers_unet({}, TINY)
    with pytest.raises(ValueError, match="has no"):
        convert_diffusers_unet({}, dataclasses.replace(TINY, num_classes=None, context_dim=None))


def test_output_shapes_labels_context(tiny):
    _, params, apply, (x, t, y, ctx) = tiny
    key = jax.random.key(0)
    out = apply(params, x, t, y, ctx, key)
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32  # learn_sigma doubles 3 -> 6
    assert np.all(np.isfinite(np.asarray(out)))
    null = apply(params, x, t, np.full(2, TINY.num_classes, np.int32), ctx, key)
    assert not np.allclose(null, out, atol=1e-4)  # labels 1, 3 vs the null class
    assert not np.allclose(apply(params, x, t, y, ctx + 1.0, key), out, atol=1e-4)  # cross-attention
    assert not np.allclose(apply(params, x, t[::-1], y, ctx, key), out, atol=1e-4)  # time embedding


def test_dropout_uses_only_the_key(tiny):
    _, params, apply, inp = tiny
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = apply(params, *inp, k1, train=True)
    assert not np.allclose(a, apply(params, *inp, k2, train=True))
    np.testing.assert_array_equal(a, apply(params, *inp, k1, train=True))
    np.testing.assert_array_equal(apply(params, *inp, k1), apply(params, *inp, k2))  # train=False
    assert not np.allclose(a, apply(params, *inp, k1))
    with pytest.raises(ValueError, match="dropout_key"):
        apply(params, *inp, None, train=True)


def test_real_init_holds_only_params():
    model = UNet(MINI, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))  # rbg: fast to compile on CPU
    _, state = nnx.split(model)
    leaves = list(nnx.to_flat_state(state))
    assert leaves and all(isinstance(v, nnx.Param) for _, v in leaves)
    assert all(v[...].dtype == jnp.float32 for _, v in leaves)
    # DDPM init_scale=0 / ADM zero_module: residual branches and the output start at zero.
    assert not np.any(model.conv_out.kernel[...]) and not np.any(model.mid_res1.conv2.kernel[...])
    assert not np.any(model.mid_attn.proj_out.kernel[...]) and np.any(model.conv_in.kernel[...])


def test_jit_matches_eager_and_null_class(mini):
    graphdef, params, apply, (x, t, y_null, ctx) = mini
    model = nnx.merge(graphdef, params)
    eager = model(x, t, None, ctx)  # y=None -> the null class
    jitted = apply(params, x, t, y_null, ctx, jax.random.key(0))
    assert eager.shape == (2, 4, 4, 3) and eager.dtype == jnp.float32
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)
    scalar_t = model(x, 5, None, ctx)  # a scalar (int) t broadcasts over the batch
    np.testing.assert_allclose(scalar_t[0], eager[0], atol=1e-6)


def test_bfloat16_compute_keeps_float32_params(mini):
    _, params, apply, inp = mini
    bf = dataclasses.replace(MINI, dtype="bfloat16")
    graphdef_bf, abstract_bf = nnx.split(nnx.eval_shape(lambda: UNet(bf, rngs=nnx.Rngs(0))), nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract_bf))
    out = make_apply(graphdef_bf)(params, *inp, jax.random.key(0))
    ref = apply(params, *inp, jax.random.key(0))
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_label_and_context_errors(tiny):
    graphdef, params, _, (x, t, y, ctx) = tiny
    model = nnx.merge(graphdef, params)
    uncond = nnx.eval_shape(lambda: UNet(dataclasses.replace(TINY, num_classes=None, context_dim=None),
                                         rngs=nnx.Rngs(0)))  # inputs are checked before any compute
    with pytest.raises(ValueError, match="num_classes"):
        uncond(x, t, y)
    with pytest.raises(ValueError, match="context_dim"):
        uncond(x, t, context=ctx)
    with pytest.raises(ValueError, match="context_dim"):
        model(x, t, y)
    with pytest.raises(ValueError, match=r"y must have shape"):
        model(x, t, y[:1], ctx)
    with pytest.raises(ValueError, match="NHWC"):
        model(x.transpose(0, 3, 1, 2), t, y, ctx)


@pytest.mark.parametrize("changes, key", [
    (dict(image_size=30), "model.image_size"),
    (dict(image_size=0), "model.image_size"),
    (dict(channels=100), "model.num_groups"),
    (dict(attention_resolutions=(7,)), "model.attention_resolutions"),
    (dict(num_res_blocks=0), "model.num_res_blocks"),
    (dict(channel_mult=()), "model.channel_mult"),
    (dict(num_heads=3), "model.num_heads"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(num_classes=0), "model.num_classes"),
    (dict(learn_sigma=True, out_channels=3), "model.out_channels"),
    (dict(fourier_weights=(1.0,) * 128), "model.fourier_weights"),                  # needs time_embedding fourier
    (dict(time_embedding="fourier", fourier_weights=(1.0,) * 7), "model.fourier_weights"),
    (dict(up_attention="first"), "model.up_attention"),
    (dict(class_embed_type="projection"), "model.class_embed_type"),
    (dict(class_embed_type="timestep", num_classes=10), "model.num_classes"),
    (dict(skip_pyramid=1), "model.skip_pyramid"),
])
def test_validate_names_the_key(changes, key):
    config = dataclasses.replace(UNetConfig(), **changes)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config.validate()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))


def test_config_defaults_and_lists():
    UNetConfig().validate()
    assert UNetConfig().resolved_out_channels == 3
    assert UNetConfig(learn_sigma=True).resolved_out_channels == 6
    assert UNetConfig(out_channels=4).resolved_out_channels == 4
    config = UNetConfig(channel_mult=[1, 2], attention_resolutions=[16])  # e.g. from ml_collections
    assert config.channel_mult == (1, 2) and hash(config)
    fourier = UNetConfig(channels=4, time_embedding="fourier", fourier_weights=[0.5, -1.0, 2.0, 3.0])   # from JSON
    assert fourier.fourier_weights == (0.5, -1.0, 2.0, 3.0) and hash(fourier)


def test_native_pyramid_and_class_embeddings():
    """The NCSN++ options on a model of the project's own (plain resampling, any widths): the image pyramids join the
    computation (the output changes with their convs), one attention per up level, the class embedding of y."""
    config = dataclasses.replace(MINI, channel_mult=(1, 2), attention_resolutions=(2,), num_classes=None,
                                 context_dim=None, skip_pyramid=True, up_attention="last", class_embed_type="timestep")
    graphdef, params = random_params(config, seed=3)
    model = nnx.merge(graphdef, params)
    assert len(model.up[0].attn) == 1 and len(model.up[0].res) == 2 and model.up[1].skip_conv is None
    assert model.down[0].skip_conv.kernel.shape == (1, 1, 3, 8) and model.up[0].skip_conv.kernel.shape == (3, 3, 16, 3)
    x, t, y = np.ones((2, 4, 4, 3), np.float32), np.array([3.0, 40.0], np.float32), np.array([1.0, 2.0], np.float32)
    out = model(x, t, y)
    assert out.shape == (2, 4, 4, 3) and np.all(np.isfinite(out))
    assert not np.allclose(out, model(x, t, y[::-1]))               # y is embedded
    model.down[0].skip_conv.kernel[...] = jnp.zeros_like(model.down[0].skip_conv.kernel[...])
    assert not np.allclose(out, model(x, t, y))                     # the input pyramid joins
    without = model(x, t, y)
    model.up[0].skip_conv.kernel[...] = jnp.zeros_like(model.up[0].skip_conv.kernel[...])
    assert not np.allclose(without, model(x, t, y))                 # the output pyramid joins
    with pytest.raises(ValueError, match=r"class_embed_type='timestep' needs y of shape \(2,\), got None"):
        model(x, t)
