"""2x up / down sampling of NHWC feature maps: plain (nearest / 2x2 mean) or FIR-filtered.

References:
  Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2):
    `upfirdn2d` (upsample by zero insertion, pad, FIR filter, downsample) and the [1, 3, 3, 1]
    resampling kernel.
  Song et al. 2021, "Score-Based Generative Modeling through SDEs", score_sde
    `models/up_or_down_sampling.py`: `upsample_2d` / `downsample_2d` (FIR, used by NCSN++ with
    `fir=True`) and `naive_upsample_2d` / `naive_downsample_2d` (used with `fir=False`).

Every function here is parameter-free: the filter is the fixed kernel `FIR_KERNEL`, normalised so a
constant image stays constant away from the (zero-padded) border.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FIR_KERNEL = (1, 3, 3, 1)
RESAMPLE_FILTERS = ("plain", "fir")


def setup_kernel(k=FIR_KERNEL) -> np.ndarray:
    """1-D taps -> separable 2-D kernel outer(k, k) / sum, (K, K) float32 summing to one."""
    k = np.asarray(k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    return k / np.sum(k)


def upfirdn2d(x: jax.Array, kernel, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> jax.Array:
    """StyleGAN2's upfirdn2d on both spatial axes, channel by channel.

    1. upsample: insert `up - 1` zeros after every sample (H -> H * up);
    2. pad `pad[0]` zeros before and `pad[1]` after;
    3. convolve with `kernel` (a true convolution: the kernel is flipped), keeping only full windows;
    4. downsample: keep every `down`-th sample, starting with the first.
    Implemented as one depthwise `conv_general_dilated` (lhs_dilation = up, stride = down).

    Args:
      x: (B, H, W, C).
      kernel: (Kh, Kw) array-like (fixed, not trained).
      up, down: integer factors >= 1.
      pad: (before, after) >= 0, the same on H and W.
    Returns:
      (B, H', W', C) with H' = (H * up + pad[0] + pad[1] - Kh) // down + 1 (W' alike), dtype of x.
    """
    k = np.asarray(kernel, np.float32)[::-1, ::-1]
    c = x.shape[-1]
    w = jnp.tile(jnp.asarray(k, x.dtype)[:, :, None, None], (1, 1, 1, c))   # (K, K, 1, C): depthwise HWIO
    p0, p1 = pad
    padding = ((p0, p1 + up - 1),) * 2   # lhs_dilation leaves no zeros after the last sample; add them
    return jax.lax.conv_general_dilated(x, w, window_strides=(down, down), padding=padding,
                                        lhs_dilation=(up, up), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c)


def fir_upsample_2d(x: jax.Array, k=FIR_KERNEL, factor: int = 2) -> jax.Array:
    """score_sde `upsample_2d`: kernel setup_kernel(k) * factor**2, pad ((p+1)//2 + factor-1, p//2),
    p = len(k) - factor. (B, H, W, C) -> (B, factor H, factor W, C)."""
    kernel = setup_kernel(k) * factor**2
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample_2d(x: jax.Array, k=FIR_KERNEL, factor: int = 2) -> jax.Array:
    """score_sde `downsample_2d`: kernel setup_kernel(k), pad ((p+1)//2, p//2), p = len(k) - factor.
    (B, H, W, C) -> (B, H / factor, W / factor, C)."""
    kernel = setup_kernel(k)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest neighbour: (B, H, W, C) -> (B, factor H, factor W, C)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Mean over factor x factor blocks (average pooling): (B, H, W, C) -> (B, H / factor, W / factor, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def _check_filter(resample_filter: str) -> None:
    if resample_filter not in RESAMPLE_FILTERS:
        raise ValueError(f"resample_filter={resample_filter!r} must be one of {list(RESAMPLE_FILTERS)}")


def upsample_2d(x: jax.Array, resample_filter: str) -> jax.Array:
    """x2 upsampling without parameters: "plain" = nearest, "fir" = [1, 3, 3, 1] FIR."""
    _check_filter(resample_filter)
    return fir_upsample_2d(x) if resample_filter == "fir" else naive_upsample_2d(x)


def downsample_2d(x: jax.Array, resample_filter: str) -> jax.Array:
    """x2 downsampling without parameters: "plain" = 2x2 mean, "fir" = [1, 3, 3, 1] FIR."""
    _check_filter(resample_filter)
    return fir_downsample_2d(x) if resample_filter == "fir" else naive_downsample_2d(x)
