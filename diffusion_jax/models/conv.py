"""2-D convolution with a kernel gradient written as matmuls: the fast path of every U-Net / VAE conv.

Why: on XLA:CPU the kernel gradient of a convolution (the "backward-filter" conv, whose contraction runs over
batch and space) is several times slower than the forward conv: a 3x3, 128 -> 128 conv on (16, 32, 32, 128)
took 33 ms forward, 33 ms for dL/dx and 131 ms for dL/dW (docs/benchmarks.md). Written as one matmul per tap,

    dL/dW[i, j] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, :]^T  dL/dy[b, h, w, :]     (C_in, C_out)

it runs near matmul speed (52-81 ms for that conv). The forward pass and the input gradient stay XLA's
convolutions (fast already). The values are the same as `lax.conv_general_dilated`'s up to float32 summation
order (tests/unit/test_conv.py).

How: `conv2d` is a `custom_jvp` whose tangent is conv(dx, w) + conv(x, dw). The second term, linear in dw, is
computed as the transpose of the matmul kernel gradient (`jax.linear_transpose`), so reverse mode, which
transposes it back, runs the matmuls; forward mode (`jax.jvp`, `jax.linearize`) works too.

`conv_general_dilated` has lax's signature, so it plugs into `nnx.Conv(conv_general_dilated=...)`; anything
but a plain NHWC / HWIO conv (dilation, groups, other layouts) goes to lax unchanged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

_NHWC = ("NHWC", "HWIO", "NHWC")


def _pads(padding, x_shape, w_shape, strides) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _conv(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def kernel_grad(x, dy, w_shape, strides, pads):
    """dL/dW (kh, kw, C_in, C_out) of conv(x, w) from x (B, H, W, C_in) and dL/dy (B, H', W', C_out): tap matmuls."""
    kh, kw = w_shape[:2]
    (sh, sw), (b, ho, wo, _) = strides, dy.shape
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    window_shape = (b, sh * (ho - 1) + 1, sw * (wo - 1) + 1, x.shape[3])

    def tap(k):   # dy^T window, (C_out, C_in): faster on XLA:CPU than window^T dy
        window = lax.dynamic_slice(xp, (0, k // kw, k % kw, 0), window_shape)[:, ::sh, ::sw]
        return lax.dot_general(dy, window, (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=jnp.float32)

    # one loop over the kh * kw taps (not kh * kw dots: XLA compiles one); checkpoint: differentiating or
    # transposing the loop slices the windows again instead of stacking all kh * kw of them as residuals
    return lax.map(jax.checkpoint(tap, prevent_cse=False), jnp.arange(kh * kw)).transpose(0, 2, 1).reshape(w_shape)


@functools.partial(jax.jit, static_argnums=(2, 3))   # traced once per conv signature, not once per call
def _conv_linear_in_w(x, dw, strides, pads):
    """conv(x, dw) as the transpose of `kernel_grad`: same values; its own transpose is the tap matmuls."""
    y = jax.eval_shape(functools.partial(_conv, strides=strides, pads=pads), x, dw)
    to_dw = lambda dy: kernel_grad(x, dy, dw.shape, strides, pads).astype(dw.dtype)   # noqa: E731
    (out,) = jax.linear_transpose(to_dw, jax.ShapeDtypeStruct(y.shape, y.dtype))(dw)
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """y = conv(x, w): x (B, H, W, C_in), w (kh, kw, C_in, C_out) -> (B, H', W', C_out); explicit pads."""
    return _conv(x, w, strides, pads)


def _conv2d_jvp(strides, pads, primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    y = _conv(x, w, strides, pads)
    dy = [] if isinstance(dx, SymbolicZero) else [_conv(dx, w, strides, pads)]
    dy += [] if isinstance(dw, SymbolicZero) else [_conv_linear_in_w(x, dw, strides, pads)]
    return y, (functools.reduce(jnp.add, dy) if dy else jnp.zeros_like(y))


conv2d.defjvp(_conv2d_jvp, symbolic_zeros=True)


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, **kwargs):
    """`lax.conv_general_dilated`, routed to `conv2d` for plain 2-D NHWC / HWIO convs (any stride, padding)."""
    undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    plain = (lhs.ndim == 4 and _is_nhwc(dimension_numbers) and feature_group_count == batch_group_count == 1
             and undilated and preferred_element_type is None and kwargs.get("out_sharding") is None)
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision=precision, preferred_element_type=preferred_element_type, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    return conv2d(lhs, rhs, strides, _pads(padding, lhs.shape, rhs.shape, strides))
