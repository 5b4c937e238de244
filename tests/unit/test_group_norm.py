"""layers.GroupNorm: the U-Net / VAE / UNetCond normalisation, against a float64 formula and flax's GroupNorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models.layers import GroupNorm


def reference(x, scale, bias, groups, eps):
    """Wu & He (2018) in float64: statistics over space and each group's channels, two-pass variance."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 16), 4), ((3, 7, 12), 3), ((2, 4, 4, 8), 8)])
def test_matches_the_formula_and_flax(shape, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 5, jnp.float32)   # an offset mean tests the variance
    norm = GroupNorm(shape[-1], groups, 1e-6, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(rng.uniform(0.5, 2, shape[-1]), jnp.float32)
    norm.bias[...] = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
    y = norm(x)
    assert y.dtype == jnp.float32 and y.shape == shape
    np.testing.assert_allclose(y, reference(x, norm.scale[...], norm.bias[...], groups, 1e-6), atol=2e-5)

    flax_norm = nnx.GroupNorm(shape[-1], num_groups=groups, epsilon=1e-6, use_fast_variance=False, rngs=nnx.Rngs(0))
    flax_norm.scale[...], flax_norm.bias[...] = norm.scale[...], norm.bias[...]
    assert set(nnx.to_pure_dict(nnx.state(norm, nnx.Param))) == set(nnx.to_pure_dict(nnx.state(flax_norm, nnx.Param)))

    def loss(module, x):
        return jnp.sum(jnp.sin(module(x)))

    g_ours = nnx.grad(loss, argnums=(0, 1))(norm, x)
    g_flax = nnx.grad(loss, argnums=(0, 1))(flax_norm, x)
    np.testing.assert_allclose(g_ours[1], g_flax[1], atol=1e-4)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(getattr(g_ours[0], name)[...], getattr(g_flax[0], name)[...], rtol=1e-4,
                                   atol=1e-4)


def test_bfloat16_input_is_normalised_in_float32():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8)).astype(jnp.bfloat16)
    y = GroupNorm(8, 2, rngs=nnx.Rngs(0))(x)
    assert y.dtype == jnp.float32


def test_channels_that_do_not_split_into_groups_are_named():
    with pytest.raises(ValueError, match="12 channels do not split into 5 groups"):
        GroupNorm(12, 5, rngs=nnx.Rngs(0))
