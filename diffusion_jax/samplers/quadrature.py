"""Integrals of Lagrange basis polynomials, the coefficients of the linear multistep samplers (LMS, DEIS)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def lagrange_integrals(nodes, q, a, b, points: int, weight=None):
    """c_j = int_a^b l_j(x) w(x) dx for j < len(nodes) (0 for j >= q), l_j(x) = prod_{k<q, k!=j} (x - x_k) / (x_j -
    x_k) the Lagrange basis on nodes[:q] (entries past q are ignored; q an int or a traced int), by the `points`-point
    Gauss-Legendre rule on [a, b] (exact for a polynomial l_j w of degree < 2 points). weight(x) -> w(x), or None (1).
    nodes (n,); a, b scalars (traced or not); returns (n,)."""
    gx, gw = np.polynomial.legendre.leggauss(points)
    h = b - a
    xs = a + 0.5 * h * (1.0 + jnp.asarray(gx, nodes.dtype))
    ws = 0.5 * h * jnp.asarray(gw, nodes.dtype)
    if weight is not None:
        ws = ws * weight(xs)
    coeffs = []
    for j in range(nodes.shape[0]):
        basis = jnp.ones_like(xs)
        for k in range(nodes.shape[0]):
            if k == j:
                continue
            use = k < q
            denom = jnp.where(use & (nodes[j] != nodes[k]), nodes[j] - nodes[k], 1.0)   # safe where masked out
            basis = basis * jnp.where(use, (xs - nodes[k]) / denom, 1.0)
        coeffs.append(jnp.where(j < q, jnp.sum(ws * basis), 0.0))
    return jnp.stack(coeffs)
