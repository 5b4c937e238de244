"""2-D convolution with a kernel gradient written as matmuls: the fast path of every U-Net / VAE conv.

Why: on XLA:CPU the kernel gradient of a convolution (the "backward-filter" conv, whose contraction runs over
batch and space) is several times slower than the forward conv: a 3x3, 128 -> 128 conv on (16, 32, 32, 128)
takes about 70 ms forward and 370 ms for dL/dW (benchmarks/conv_grad.py). Written as one matmul per kernel
tap,

    dL/dW[i, j] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, :]^T  dL/dy[b, h, w, :]     (C_in, C_out)

it runs at matmul speed. The forward pass and the input gradient stay XLA's convolutions (fast already). The
values are the same as `lax.conv_general_dilated`'s up to float32 summation order (tests/test_conv.py).

`conv_general_dilated` has lax's signature, so it plugs into `nnx.Conv(conv_general_dilated=...)`; anything
but a plain NHWC / HWIO conv (dilation, groups, other layouts) goes to lax unchanged.

Forward-mode autodiff (`jax.jvp`, `jax.linearize`) cannot go through a `custom_vjp`: trace such code inside
`with forward_mode():`, where the convs are plain lax convs (likelihood.py does, for its divergence).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
_FORWARD_MODE = contextvars.ContextVar("diffusion_jax_conv_forward_mode", default=False)


@contextlib.contextmanager
def forward_mode():
    """Convs traced inside are plain `lax.conv_general_dilated` (jvp-able; XLA's own kernel gradient)."""
    token = _FORWARD_MODE.set(True)
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


def _pads(padding, x_shape, w_shape, strides) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _conv(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """y = conv(x, w): x (B, H, W, C_in), w (kh, kw, C_in, C_out) -> (B, H', W', C_out); explicit pads."""
    return _conv(x, w, strides, pads)


def _conv2d_fwd(x, w, strides, pads):
    return _conv(x, w, strides, pads), (x, w)


def _conv2d_bwd(strides, pads, res, dy):
    x, w = res
    _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, strides, pads), x)
    (dx,) = vjp_x(dy)
    kh, kw = w.shape[:2]
    (sh, sw), (b, ho, wo, _) = strides, dy.shape
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    window_shape = (b, sh * (ho - 1) + 1, sw * (wo - 1) + 1, x.shape[3])

    def tap(k):   # dy^T window, (C_out, C_in): faster on XLA:CPU than window^T dy
        window = lax.dynamic_slice(xp, (0, k // kw, k % kw, 0), window_shape)[:, ::sh, ::sw]
        return lax.dot_general(dy, window, (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=jnp.float32)

    # one loop over the kh * kw taps (not kh * kw dots: XLA compiles one)
    dw = lax.map(tap, jnp.arange(kh * kw)).transpose(0, 2, 1).reshape(w.shape).astype(w.dtype)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


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
    plain = (not _FORWARD_MODE.get() and lhs.ndim == 4 and _is_nhwc(dimension_numbers) and feature_group_count == 1 and batch_group_count == 1
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and preferred_element_type is None and kwargs.get("out_sharding") is None)
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision=precision, preferred_element_type=preferred_element_type, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    return conv2d(lhs, rhs, strides, _pads(padding, lhs.shape, rhs.shape, strides))
