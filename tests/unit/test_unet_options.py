"""Tests of the score_sde U-Net options: Fourier time features, FIR resampling, BigGAN ResBlocks,
skip rescaling (Song et al. 2021, DDPM++ / NCSN++), each against an independent formula."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from conftest import random_params

from diffusion_jax.models import UNet, UNetConfig
from diffusion_jax.models.functional import split_params
from diffusion_jax.models.layers import AttentionBlock, Downsample, ResBlock, Upsample
from diffusion_jax.models.resample import downsample_2d, fir_downsample_2d, fir_upsample_2d, upfirdn2d, upsample_2d

FAST = {"xla_backend_optimization_level": 0}  # tiny graphs: compiling costs more than running
SMALL = UNetConfig(image_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                   num_groups=4, dropout=0.0)  # the middle block still attends
SMALL_PARAMS = 41_899  # UNet(SMALL), DDPM layout: counted by hand layer by layer
NCSNPP = dataclasses.replace(SMALL, time_embedding="fourier", resblock="biggan", resample_filter="fir",
                             skip_rescale=True)


def upfirdn2d_numpy(x, k, up=1, down=1, pad=(0, 0)):
    """StyleGAN2's reference upfirdn2d written out: zero-insert, pad, true convolution, subsample."""
    b, h, w, c = x.shape
    u = np.zeros((b, h * up, w * up, c), np.float64)
    u[:, ::up, ::up] = x
    u = np.pad(u, ((0, 0), pad, pad, (0, 0)))
    kh, kw = k.shape
    oh, ow = u.shape[1] - kh + 1, u.shape[2] - kw + 1
    y = np.zeros((b, oh, ow, c))
    for i in range(kh):
        for j in range(kw):
            y += u[:, i:i + oh, j:j + ow] * k[kh - 1 - i, kw - 1 - j]
    return y[:, ::down, ::down]


FIR = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0  # score_sde _setup_kernel([1, 3, 3, 1])


def test_upfirdn2d_matches_numpy():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 7, 7, 3).astype(np.float32)
    k = rng.randn(4, 3).astype(np.float32)  # asymmetric, non-square: checks the flip and both axes
    for up, down, pad in [(1, 1, (0, 0)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (1, 2)), (3, 1, (0, 2))]:
        ours = np.asarray(upfirdn2d(jnp.asarray(x), k, up=up, down=down, pad=pad))
        np.testing.assert_allclose(ours, upfirdn2d_numpy(x, k, up, down, pad), atol=1e-5)


def test_fir_resampling_matches_numpy_and_keeps_constants():
    x = np.random.RandomState(1).randn(2, 8, 8, 3).astype(np.float32)
    up = np.asarray(fir_upsample_2d(jnp.asarray(x)))
    down = np.asarray(fir_downsample_2d(jnp.asarray(x)))
    err_up = np.max(np.abs(up - upfirdn2d_numpy(x, FIR * 4, up=2, pad=(2, 1))))
    err_down = np.max(np.abs(down - upfirdn2d_numpy(x, FIR, down=2, pad=(1, 1))))
    print(f"FIR max abs diff vs numpy: up {err_up:.2e}, down {err_down:.2e}")
    assert up.shape == (2, 16, 16, 3) and down.shape == (2, 4, 4, 3)
    assert err_up < 1e-5 and err_down < 1e-5
    ones = jnp.full((1, 8, 8, 2), 0.7)  # constant in, constant out away from the zero-padded border
    np.testing.assert_allclose(fir_upsample_2d(ones)[:, 2:-2, 2:-2], 0.7, rtol=1e-6)
    np.testing.assert_allclose(fir_downsample_2d(ones)[:, 1:-1, 1:-1], 0.7, rtol=1e-6)
    # plain: nearest up, 2x2 mean down
    np.testing.assert_array_equal(upsample_2d(x, "plain"), x.repeat(2, 1).repeat(2, 2))
    np.testing.assert_allclose(downsample_2d(x, "plain"), x.reshape(2, 4, 2, 4, 2, 3).mean((2, 4)), atol=1e-6)
    with pytest.raises(ValueError, match="resample_filter"):
        upsample_2d(x, "box")


def _delta_conv(layer):
    """Set a 3x3 conv to the identity (centre tap, no bias)."""
    c = layer.conv.kernel.shape[-1]
    kernel = np.zeros((3, 3, c, c), np.float32)
    kernel[1, 1] = np.eye(c)
    layer.conv.kernel[...] = jnp.asarray(kernel)
    layer.conv.bias[...] = jnp.zeros(c)


def test_fused_fir_conv_layers_reduce_to_fir_resampling():
    """With an identity 3x3 kernel, score_sde's blur + stride-2 conv (down) and transposed conv + blur
    (up) are exactly the FIR resampling: this pins their paddings."""
    x = jnp.asarray(np.random.RandomState(2).randn(2, 8, 8, 4), jnp.float32)
    rngs = nnx.Rngs(jax.random.key(0, impl="unsafe_rbg"))
    down = Downsample(4, dtype=jnp.float32, rngs=rngs, resample_filter="fir")
    up = Upsample(4, dtype=jnp.float32, rngs=rngs, resample_filter="fir")
    for layer in (down, up):
        _delta_conv(layer)
    np.testing.assert_allclose(down(x), fir_downsample_2d(x), atol=1e-5)
    np.testing.assert_allclose(up(x), fir_upsample_2d(x), atol=1e-5)


def test_skip_rescale_scales_residual_sums():
    x = jnp.asarray(np.random.RandomState(3).randn(2, 8, 8, 8), jnp.float32)
    emb = jnp.ones((2, 16))
    rbg = lambda seed: nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))  # noqa: E731  (fast to compile)
    kw = dict(groups=4, dropout_rate=0.0, dtype=jnp.float32, rngs=rbg(0))
    for rescale, s in [(False, 1.0), (True, 1 / math.sqrt(2))]:
        block = ResBlock(8, 8, 16, skip_rescale=rescale, **kw)  # conv2 starts at zero: branch is zero
        np.testing.assert_allclose(block(x, emb), x * s, rtol=1e-6)
        attn = AttentionBlock(8, num_heads=2, groups=4, context_dim=None, dtype=jnp.float32, rngs=rbg(0),
                              skip_rescale=rescale)  # proj_out starts at zero
        np.testing.assert_allclose(attn(x), x * s, rtol=1e-6)
        # BigGAN down block: 1x1 skip conv even at equal widths; set to the identity
        down = ResBlock(8, 8, 16, resample="down", resample_filter="fir", skip_rescale=rescale, **kw)
        down.skip.kernel[...] = jnp.eye(8)[None, None]
        np.testing.assert_allclose(down(x, emb), fir_downsample_2d(x) * s, rtol=1e-5, atol=1e-6)
    # With a non-zero branch the whole sum (x + h) is scaled: same weights, outputs differ by 1/sqrt(2).
    blocks = [ResBlock(8, 8, 16, skip_rescale=r, **{**kw, "rngs": rbg(7)}) for r in (False, True)]
    for block in blocks:
        block.conv2.kernel[...] = jnp.full(block.conv2.kernel.shape, 0.01)
    plain, rescaled = (np.asarray(block(x, emb)) for block in blocks)
    assert np.max(np.abs(plain - x)) > 1e-2
    np.testing.assert_allclose(rescaled, plain / math.sqrt(2), rtol=1e-5, atol=1e-6)


def test_fourier_features_formula_fixed_and_not_params():
    config = dataclasses.replace(NCSNPP, image_size=8, channel_mult=(1,), attention_resolutions=())
    graphdef, params = random_params(config)
    model = nnx.merge(graphdef, params)
    sigma = np.array([0.01, 3.0, 50.0], np.float32)
    w = np.random.RandomState(0).standard_normal(config.channels) * config.fourier_scale  # W ~ N(0, 16^2)
    proj = 2 * np.pi * np.log(sigma.astype(np.float64))[:, None] * w[None, :]
    expected = np.concatenate([np.sin(proj), np.cos(proj)], axis=-1)
    np.testing.assert_allclose(model.time_features(sigma), expected, atol=2e-4)
    no_log = nnx.merge(*random_params(dataclasses.replace(config, fourier_log_input=False)))
    c_noise = np.log(sigma) / 4  # EDM's c_noise, negative here: embedded as given
    proj = 2 * np.pi * c_noise.astype(np.float64)[:, None] * w[None, :]
    np.testing.assert_allclose(no_log.time_features(c_noise), np.concatenate([np.sin(proj), np.cos(proj)], -1),
                               atol=2e-4)
    # W is no state at all: every leaf is an nnx.Param (split_params raises otherwise), none holds W,
    # and another init (a restore builds the model anew from the saved config) has the same W.
    _, pure = split_params(model)
    assert not any(leaf.shape == w.shape and np.allclose(leaf, w, rtol=1e-4) for leaf in jax.tree.leaves(pure))
    other = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(123)))
    np.testing.assert_array_equal(other.time_features(sigma), model.time_features(sigma))

    # One optimiser step on everything the optimiser sees: params move, the features do not.
    x = jnp.asarray(np.random.RandomState(4).randn(3, 8, 8, 3), jnp.float32)
    pure = nnx.to_pure_dict(params)
    tx = optax.adam(1e-2)

    def step(p, opt):
        loss, g = jax.value_and_grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(x, sigma) ** 2))(p)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    new, _, loss = jax.jit(step, compiler_options=FAST)(pure, tx.init(pure))
    assert np.isfinite(float(loss))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(pure), jax.tree.leaves(new)))
    state = nnx.state(nnx.merge(graphdef, params), nnx.Param)
    nnx.replace_by_pure_dict(state, new)
    np.testing.assert_allclose(nnx.merge(graphdef, state).time_features(sigma), expected, atol=2e-4)


COMBOS = list(itertools.product(("positional", "fourier"), ("ddpm", "biggan"), ("plain", "fir"), (False, True)))


def expected_params(time_embedding: str, resblock: str) -> int:
    """Only the time MLP (Fourier: 2C inputs) and the BigGAN resampling blocks change the parameters:
    a BigGAN block (2 norms, 2 3x3 convs, time projection, 1x1 skip) replaces each 3x3 resampling conv."""
    c, emb = SMALL.channels, 4 * SMALL.channels
    n = SMALL_PARAMS + (c * emb if time_embedding == "fourier" else 0)
    if resblock == "biggan":
        for ch in (c, 2 * c):  # Downsample at level 0, Upsample at level 1
            n += 4 * ch + (9 * ch * ch + ch) + (emb * ch + ch) + (ch * ch + ch)
    return n


def test_every_combination_builds_jits_and_runs():
    """All 16 option combinations on (2, 16, 16, 3), compiled as one jitted function (one compile is much
    cheaper than 16 on CPU). Same-shaped params are filled identically, so options must change the output."""
    configs = [dataclasses.replace(SMALL, time_embedding=te, resblock=rb, resample_filter=rf, skip_rescale=sr)
               for te, rb, rf, sr in COMBOS]
    models = [random_params(config) for config in configs]
    for (te, rb, rf, sr), (_, params) in zip(COMBOS, models):
        n = sum(x.size for x in jax.tree.leaves(params))
        print(f"{te:10s} {rb:6s} {rf:5s} skip_rescale={sr!s:5s} params={n}")
        assert n == expected_params(te, rb) > 0
    graphdefs = [graphdef for graphdef, _ in models]
    forward = jax.jit(lambda ps, x, t: [nnx.merge(g, p)(x, t) for g, p in zip(graphdefs, ps)], compiler_options=FAST)
    x = np.random.RandomState(5).randn(2, 16, 16, 3).astype(np.float32)
    t = np.array([0.5, 20.0], np.float32)  # a sigma for "fourier", a DDPM timestep for "positional"
    outs = dict(zip(COMBOS, forward([params for _, params in models], x, t)))
    for out in outs.values():
        assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(out))) and float(jnp.std(out)) > 0
    for te, rb in itertools.product(("positional", "fourier"), ("ddpm", "biggan")):
        assert not np.allclose(outs[te, rb, "plain", False], outs[te, rb, "plain", True], atol=1e-4)
        assert not np.allclose(outs[te, rb, "plain", False], outs[te, rb, "fir", False], atol=1e-4)


def test_biggan_dropout_uses_the_key():
    config = dataclasses.replace(NCSNPP, dropout=0.3, attention_resolutions=())
    graphdef, params = random_params(config)
    apply = jax.jit(lambda p, x, t, k: nnx.merge(graphdef, p)(x, t, train=True, dropout_key=k),
                    compiler_options=FAST)
    x = np.random.RandomState(6).randn(2, 16, 16, 3).astype(np.float32)
    t = np.array([1.0, 2.0], np.float32)
    k1 = jax.random.key(1, impl="unsafe_rbg")
    a = apply(params, x, t, k1)
    np.testing.assert_array_equal(a, apply(params, x, t, k1))
    assert not np.allclose(a, apply(params, x, t, jax.random.key(2, impl="unsafe_rbg")))


@pytest.mark.parametrize("changes, key", [
    (dict(time_embedding="sinusoidal"), "model.time_embedding"),
    (dict(resblock="resnet"), "model.resblock"),
    (dict(resample_filter="box"), "model.resample_filter"),
    (dict(fourier_scale=0.0), "model.fourier_scale"),
    (dict(fourier_scale=-16.0), "model.fourier_scale"),
    (dict(fourier_scale=float("inf")), "model.fourier_scale"),
    (dict(fourier_scale=True), "model.fourier_scale"),
    (dict(fourier_log_input=1), "model.fourier_log_input"),
    (dict(skip_rescale="yes"), "model.skip_rescale"),
])
def test_invalid_options_name_the_key(changes, key):
    config = dataclasses.replace(SMALL, **changes)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config.validate()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
