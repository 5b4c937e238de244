"""The conv with a matmul kernel gradient (models/conv.py) gives lax's values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffusion_jax.models.conv import conv_general_dilated

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


def test_forward_mode_and_second_order_autodiff_match_lax():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 3), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4), np.float32))
    dx, dw = x[::-1], w * 0.5 - 0.1
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def f(conv, x, w):
        return jnp.sin(conv(x, w, (2, 1), ((1, 0), (1, 1)), dimension_numbers=dn))

    for argnums, tangents in (((0, 1), (dx, dw)), ((0,), (dx,)), ((1,), (dw,))):
        def along(conv, argnums=argnums):   # f as a function of the differentiated arguments only
            return lambda *a: f(conv, *[a[argnums.index(i)] if i in argnums else (x, w)[i] for i in range(2)])
        primals = tuple((x, w)[i] for i in argnums)
        ours = jax.jit(lambda p, t: jax.jvp(along(conv_general_dilated), p, t))(primals, tangents)
        ref = jax.jvp(along(lax.conv_general_dilated), primals, tangents)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Hessian-vector product in w (forward over reverse): the transposed matmul kernel gradient is jvp-able too
    def hvp(conv):
        g = jax.grad(lambda w: jnp.sum(f(conv, x, w) ** 2))
        return jax.jvp(g, (w,), (dw,))[1]
    np.testing.assert_allclose(jax.jit(lambda: hvp(conv_general_dilated))(), hvp(lax.conv_general_dilated),
                               rtol=1e-3, atol=1e-3)


def test_reverse_mode_kernel_gradient_runs_the_tap_matmuls():
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 3))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(conv_general_dilated(x, w, (1, 1), "SAME",
                                                                                dimension_numbers=dn))))(w))
    assert jaxpr.count("conv_general_dilated") == 1      # the forward conv; dL/dW is no backward-filter conv
    assert jaxpr.count("dot_general") == 1 and jaxpr.count("scan[") == 1   # but one matmul in one loop over taps
