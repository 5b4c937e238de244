"""What is known of the clean image: values y and a binary mask, in pixel space or in an orthogonal colour space.

Score-based imputation (Song et al. 2021, "Score-Based Generative Modeling through SDEs", app. I.2) splits x into
a known part Omega(x) and an unknown part Omega_bar(x). Colorization (app. I.3) does the same after a per-pixel
orthogonal change of colour coordinates u = x M (M (C, C), M^T M = I): the known part is the gray channel u_0.
Because M is orthogonal, the forward noise stays isotropic in u:  u_t = x_t M = alpha u_0 + sigma (eps M), and
eps M ~ N(0, I), so the same replacement works in either space:

    substitute(x_t, alpha, sigma, z) = ( m * (alpha y + sigma z) + (1 - m) * (x_t M) ) M^T         z ~ N(0, I)
    project(x)                    = ( m * y + (1 - m) * (x M) ) M^T

with y (N, H, W, C) the known values and m (N|1, H|1, W|1, 1|C) in {0, 1} (1 = known), both in u coordinates.
Without a transform (inpainting) M = I and no product is taken: project keeps y bit for bit.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Known:
    """values (N, H, W, C) float32, mask (N|1, H|1, W|1, 1|C) float32 of {0, 1} (1 = known), transform (C, C)
    orthogonal (columns = the new basis) or None (pixel space). Build with `known(...)`."""

    values: jax.Array
    mask: jax.Array
    transform: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def to_space(self, x):
        return x if self.transform is None else jnp.einsum("...c,cd->...d", x, self.transform)

    def from_space(self, u):
        return u if self.transform is None else jnp.einsum("...d,cd->...c", u, self.transform)

    def substitute(self, x, alpha, sigma, z):
        """x_t with its known part set to alpha y + sigma z. alpha, sigma: scalars or (N,); z: (N, H, W, C) N(0, I)."""
        alpha, sigma = (jnp.reshape(v, jnp.shape(v) + (1,) * (x.ndim - jnp.ndim(v))) for v in (alpha, sigma))
        noised = alpha * self.values + sigma * z
        return self.from_space(jnp.where(self.mask > 0, noised, self.to_space(x))).astype(x.dtype)

    def project(self, x):
        """x with its known part set to y exactly (in pixel space, bit for bit)."""
        return self.from_space(jnp.where(self.mask > 0, self.values, self.to_space(x))).astype(x.dtype)


def known(values, mask, transform=None, num: int | None = None) -> Known:
    """A `Known` with values (1 or N, H, W, C) broadcast to `num` images (default: as given). Shapes are checked
    here; the caller validates values and mask (`validate.check_images` / `check_mask`)."""
    values = jnp.asarray(values, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if values.ndim != 4:
        raise ValueError(f"known values must be (N, H, W, C), got shape {values.shape}")
    if num is not None:
        if values.shape[0] not in (1, num):
            raise ValueError(f"known values hold {values.shape[0]} image(s); give 1 or num={num}")
        values = jnp.broadcast_to(values, (num,) + values.shape[1:])
    if mask.ndim != 4 or jnp.broadcast_shapes(mask.shape, values.shape) != values.shape:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to the values' {values.shape}")
    if transform is not None:
        transform = jnp.asarray(transform, jnp.float32)
        if transform.shape != (values.shape[-1],) * 2:
            raise ValueError(f"transform must be ({values.shape[-1]}, {values.shape[-1]}), got {transform.shape}")
    return Known(values, mask, transform)
