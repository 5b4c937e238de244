"""The conv with a matmul kernel gradient (models/conv.py) gives lax's values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffusion_jax.models.conv import conv_general_dilated, forward_mode

NHWC = ("NHWC", "HWIO", "NHWC")
CASES = [  # (kernel, stride, padding)
    (3, 1, "SAME"), (3, 2, ((0, 1), (0, 1))), (1, 1, "VALID"), (3, 1, ((2, 2), (2, 2))), (4, 2, ((1, 1), (1, 1))),
    (3, 2, "VALID")]


@pytest.mark.parametrize("k,stride,padding", CASES)
def test_values_and_gradients_match_lax(k, stride, padding):
    rng = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, 5), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, 5, 6), np.float32))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w, (stride, stride), padding, dimension_numbers=dn)))

    ref = jax.value_and_grad(lambda x, w: loss(lax.conv_general_dilated, x, w), argnums=(0, 1))(x, w)
    ours = jax.jit(jax.value_and_grad(lambda x, w: loss(conv_general_dilated, x, w), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1], ref[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_dilated_and_grouped_convs_go_to_lax_unchanged():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 6, 6, 4), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 4), np.float32))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    for kw in ({"feature_group_count": 2}, {"lhs_dilation": (2, 2), "feature_group_count": 2}):
        a = conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn, **kw)
        b = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn, **kw)
        np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_keeps_the_kernel_gradient_dtype():
    x = jnp.ones((1, 4, 4, 3), jnp.bfloat16)
    w = jnp.ones((3, 3, 3, 2), jnp.bfloat16)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    g = jax.grad(lambda w: jnp.sum(conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
                                   .astype(jnp.float32)))(w)
    assert g.dtype == jnp.bfloat16
    assert float(g[1, 1, 0, 0]) == 16.0   # the centre tap sees every one of the 16 pixels


def test_forward_mode_autodiff_goes_through_lax_convs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 5, 5, 2), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 3), np.float32))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    f = lambda x: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)  # noqa: E731
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (x,), (x,))
    with forward_mode():
        _, tangent = jax.jvp(f, (x,), (x,))
    np.testing.assert_allclose(tangent, f(x), rtol=1e-5, atol=1e-5)   # the conv is linear in x
