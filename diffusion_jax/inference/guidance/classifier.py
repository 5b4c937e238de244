"""A noise-conditional classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

ADM's classifier is the encoder half of its U-Net with attention pooling. At CPU scale we use a small conv net
instead: 3x3 convs of (width, stride) (32, 2), (64, 2), (64, 1), (128, 2) by default, each followed by GroupNorm
whose scale and shift come from the noise embedding (FiLM: h <- GN(h) (1 + s(e)) + b(e), as ADM's
`use_scale_shift_norm`), then SiLU; global average pooling; a linear head to the logits. SiLU, not ReLU,
because guidance differentiates the classifier with respect to its input.

The noise level, not the sampler's step index, is the classifier's time input. Any level x = alpha x0 + sigma eps
is first brought to variance-preserving form and read through its log-SNR:

    x_vp = x / sqrt(alpha^2 + sigma^2),      lambda = log(alpha^2 / sigma^2),
    c(lambda) = 25 (20 - clip(lambda, -20, 20)) in [0, 1000],   e = MLP(sinusoidal(c))

(x_vp = alpha' x0 + sigma' eps with alpha'^2 + sigma'^2 = 1 and the same lambda.) For the DDPM schedules
alpha^2 + sigma^2 = 1, so x_vp = x_t and lambda_t = log(abar_t / (1 - abar_t)) is a monotone relabelling of t;
a continuous schedule (VP, sub-VP, VE, EDM: alpha = 1, sigma = s) maps through the same two formulas, so one
classifier serves every sampler and every schedule whose log-SNR range it was trained on.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.layers import timestep_embedding

LOG_SNR_RANGE = 20.0      # |lambda| beyond this is clipped (DDPM linear: lambda in [-10.1, 9.2])


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What the classifier sees and how wide it is. image_shape: (H, W, C) of x_t; num_classes: K.
    convs: (width, stride) per conv; emb_dim: width of the noise embedding; groups: GroupNorm groups."""
    image_shape: tuple[int, int, int]
    num_classes: int
    convs: tuple[tuple[int, int], ...] = ((32, 2), (64, 2), (64, 1), (128, 2))
    emb_dim: int = 128
    groups: int = 8

    def __post_init__(self):
        shape = tuple(int(d) for d in self.image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"classifier image_shape must be (H, W, C) positive ints, got {self.image_shape!r}")
        if not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            raise ValueError(f"classifier num_classes must be an int >= 2, got {self.num_classes!r}")
        convs = tuple((int(w), int(s)) for w, s in self.convs)
        if not convs or any(w < 1 or s < 1 or w % self.groups for w, s in convs):
            raise ValueError(f"classifier convs must be (width, stride) pairs with widths divisible by groups="
                             f"{self.groups}, got {self.convs!r}")
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "convs", convs)

    def to_dict(self) -> dict:
        return {"image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "convs": [list(c) for c in self.convs], "emb_dim": self.emb_dim, "groups": self.groups}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierSpec":
        return cls(tuple(d["image_shape"]), int(d["num_classes"]), tuple(tuple(c) for c in d["convs"]),
                   int(d["emb_dim"]), int(d["groups"]))


def noise_condition(x, alpha, sigma):
    """(x_vp, lambda): x / sqrt(alpha^2 + sigma^2) and the log-SNR, alpha / sigma scalars or (B,) (module doc)."""
    b = x.shape[0]
    alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32).reshape(-1), (b,))
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (b,))
    norm = jnp.sqrt(alpha ** 2 + sigma ** 2).reshape((b,) + (1,) * (x.ndim - 1))
    log_snr = 2.0 * (jnp.log(alpha) - jnp.log(sigma))          # +inf at sigma = 0, -inf at alpha = 0: clipped below
    return x / norm, log_snr


class NoisyClassifier(nnx.Module):
    """(x_vp (B, H, W, C), lambda (B,)) -> logits (B, K); see the module doc for the architecture."""

    def __init__(self, spec: ClassifierSpec, *, rngs: nnx.Rngs):
        c, e = spec.image_shape[-1], spec.emb_dim
        self.emb_dim = e
        self.emb_in = nnx.Linear(e, e, rngs=rngs)
        self.emb_out = nnx.Linear(e, e, rngs=rngs)
        convs, norms, films = [], [], []
        for width, stride in spec.convs:
            convs.append(nnx.Conv(c, width, (3, 3), strides=stride, rngs=rngs))
            norms.append(nnx.GroupNorm(width, num_groups=spec.groups, use_scale=False, use_bias=False, rngs=rngs))
            films.append(nnx.Linear(e, 2 * width, kernel_init=nnx.initializers.zeros_init(), rngs=rngs))
            c = width
        self.convs, self.norms, self.films = nnx.List(convs), nnx.List(norms), nnx.List(films)
        self.head = nnx.Linear(c, spec.num_classes, rngs=rngs)

    def __call__(self, x, log_snr):
        lam = jnp.clip(log_snr, -LOG_SNR_RANGE, LOG_SNR_RANGE)
        emb = timestep_embedding(25.0 * (LOG_SNR_RANGE - lam), self.emb_dim)
        emb = jax.nn.silu(self.emb_out(jax.nn.silu(self.emb_in(emb))))
        for conv, norm, film in zip(self.convs, self.norms, self.films):
            scale, shift = jnp.split(film(emb)[:, None, None, :], 2, axis=-1)
            x = jax.nn.silu(norm(conv(x)) * (1.0 + scale) + shift)
        return self.head(x.mean(axis=(1, 2)))


def make_model(spec: ClassifierSpec, rngs: nnx.Rngs) -> NoisyClassifier:
    return NoisyClassifier(spec, rngs=rngs)


def make_log_prob_fn(graphdef):
    """log_prob(params, x, alpha, sigma) -> (B, K) log p_phi(y | x) for x = alpha x0 + sigma eps (x (B, H, W, C);
    alpha, sigma scalars or (B,)). Examples do not interact (GroupNorm is per example)."""
    def log_prob(params, x, alpha, sigma):
        x_vp, log_snr = noise_condition(x, alpha, sigma)
        return jax.nn.log_softmax(nnx.merge(graphdef, params)(x_vp, log_snr), axis=-1)
    return log_prob
