"""Tests of the DDPM / ADM U-Net: pinned size, parity with diffusers, functional use, validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models import UNet, UNetConfig, convert_diffusers_unet, unet_config_from_diffusers

DDPM_CIFAR10_PARAMS = 35_746_307  # diffusers UNet2DModel for google/ddpm-cifar10-32

# google/ddpm-cifar10-32 unet/config.json (the keys that matter).
DDPM_CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6, norm_num_groups=32,
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional")

TINY = UNetConfig(image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, num_groups=8, dropout=0.1,
                  num_classes=3, context_dim=6, learn_sigma=True)


def n_params(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.fixture(scope="module")
def tiny():
    model = UNet(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    apply = jax.jit(lambda p, *a, **k: nnx.merge(graphdef, p)(*a, **k), static_argnames="train")
    rng = np.random.RandomState(0)
    inputs = dict(x=rng.randn(2, 8, 8, 3).astype(np.float32), t=np.array([0.0, 999.0], np.float32),
                  y=np.array([1, 3], np.int32), context=rng.randn(2, 5, 6).astype(np.float32))
    return model, graphdef, params, apply, inputs


def test_ddpm_cifar10_parameter_count():
    abstract = nnx.eval_shape(lambda: UNet(UNetConfig(), rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    assert n_params(params) == DDPM_CIFAR10_PARAMS
    assert not jax.tree.leaves(rest)
    assert unet_config_from_diffusers(DDPM_CIFAR10_DIFFUSERS, dropout=0.1) == UNetConfig()


def test_ddpm_cifar10_parameter_count_matches_diffusers():
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DModel(**DDPM_CIFAR10_DIFFUSERS)
    assert sum(p.numel() for p in ref.parameters()) == DDPM_CIFAR10_PARAMS


def test_parity_with_diffusers():
    """Random diffusers UNet2DModel -> convert -> same outputs (NCHW <-> NHWC)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=32, num_class_embeds=4,
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6).eval()
    with torch.no_grad():  # perturb every tensor so norm scales / zero biases are exercised too
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = unet_config_from_diffusers(ref.config)
    assert (config.num_heads, config.attention_resolutions, config.num_classes) == (2, (8,), 4)
    params = convert_diffusers_unet(ref.state_dict(), config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.RandomState(1)
    x = rng.randn(2, 16, 16, 3).astype(np.float32)
    t = np.array([3.0, 517.5], np.float32)
    y = np.array([0, 3], np.int64)
    ours = jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y))(params, x, t, y)
    with torch.no_grad():
        out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                  class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours), out, atol=1e-4, rtol=1e-4)
    # The appended null-class row is zero: y=None equals "no class embedding".
    assert np.all(np.asarray(params["class_embed"]["embedding"][...][-1]) == 0)


def test_converter_rejects_mismatches():
    with pytest.raises(ValueError, match="flip_sin_to_cos"):
        unet_config_from_diffusers({**DDPM_CIFAR10_DIFFUSERS, "flip_sin_to_cos": True})
    with pytest.raises(ValueError, match="downsample_padding"):
        unet_config_from_diffusers({k: v for k, v in DDPM_CIFAR10_DIFFUSERS.items() if k != "downsample_padding"})
    tiny = dataclasses.replace(TINY, num_classes=None, context_dim=None)
    with pytest.raises(ValueError, match="has no"):
        convert_diffusers_unet({}, tiny)


def test_output_shapes_and_only_params(tiny):
    model, graphdef, params, apply, inp = tiny
    out = apply(params, **inp)
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32  # learn_sigma doubles 3 -> 6
    assert np.all(np.isfinite(np.asarray(out)))
    _, state = nnx.split(model)
    assert all(isinstance(v, nnx.Param) for _, v in state.flat_state())
    assert n_params(state) == n_params(params)
    # Null class (y=None) and an explicit null label agree, and differ from a real label.
    null = apply(params, inp["x"], inp["t"], None, inp["context"])
    explicit = apply(params, inp["x"], inp["t"], np.full(2, TINY.num_classes, np.int32), inp["context"])
    np.testing.assert_allclose(null, explicit, atol=1e-6)
    assert not np.allclose(null[0], out[0], atol=1e-4)  # label 1 vs null
    # Context matters (cross-attention is wired in).
    other = apply(params, inp["x"], inp["t"], inp["y"], inp["context"] + 1.0)
    assert not np.allclose(other, out, atol=1e-4)


def test_jit_matches_eager_and_scalar_t(tiny):
    model, _, params, apply, inp = tiny
    eager = model(**inp)
    np.testing.assert_allclose(eager, apply(params, **inp), atol=1e-5, rtol=1e-5)
    t_int = model(inp["x"], 7, inp["y"], inp["context"])  # scalar int t broadcasts
    t_vec = model(inp["x"], np.array([7.0, 7.0]), inp["y"], inp["context"])
    np.testing.assert_allclose(t_int, t_vec, atol=1e-6)


def test_dropout_uses_only_the_key(tiny):
    _, _, params, apply, inp = tiny
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = apply(params, **inp, train=True, dropout_key=k1)
    b = apply(params, **inp, train=True, dropout_key=k2)
    a2 = apply(params, **inp, train=True, dropout_key=k1)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(apply(params, **inp), apply(params, **inp, dropout_key=k1))
    with pytest.raises(ValueError, match="dropout_key"):
        apply(params, **inp, train=True)


def test_gradients_flow(tiny):
    _, graphdef, params, _, inp = tiny
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(**inp, train=True, dropout_key=jax.random.key(0)) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.9 * len(norms)


def test_bfloat16_compute_keeps_float32_params(tiny):
    model, _, params, _, inp = tiny
    bf = dataclasses.replace(TINY, dtype="bfloat16")
    graphdef_bf, params_bf = nnx.split(nnx.eval_shape(lambda: UNet(bf, rngs=nnx.Rngs(0))), nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_bf))
    out = nnx.merge(graphdef_bf, params)(**inp)
    ref = model(**inp)
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_label_and_context_errors(tiny):
    model, _, _, _, inp = tiny
    uncond = UNet(dataclasses.replace(TINY, num_classes=None, context_dim=None), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes"):
        uncond(inp["x"], inp["t"], inp["y"])
    with pytest.raises(ValueError, match="context_dim"):
        uncond(inp["x"], inp["t"], context=inp["context"])
    with pytest.raises(ValueError, match="context_dim"):
        model(inp["x"], inp["t"], inp["y"])
    with pytest.raises(ValueError, match="NHWC"):
        model(inp["x"].transpose(0, 3, 1, 2), inp["t"], inp["y"], inp["context"])


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
