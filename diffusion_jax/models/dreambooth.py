"""DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation") for a class-conditional U-Net: the whole network is fine-tuned on a few images of one subject, bound to
a new label, the identifier [V], while class images that the frozen base drew for the subject's class keep that
class's prior (the prior-preservation loss, eq. 2):

    E [ ||x_hat(a_t x + s_t e, c_[V]) - x||^2  +  lambda ||x_hat(a_t x_pr + s_t e', c_class) - x_pr||^2 ]

A text model's "a [V] dog" puts a rare token in front of the class noun; here the identifier is a new label, K (the
base has labels 0..K-1 and the null label K), whose embedding starts near the class's: the class's row plus a fixed
random offset (`identifier_offset` times the mean distance between two of the base's labels):

    base labels      0 .. K-1 | K (null)
    DreamBooth       0 .. K-1 | K = [V] (row class_label + offset) | K+1 (null: the base's null row)

The offset matters (experiments/dreambooth_digits.py): with [V] an exact copy of the class's row (offset 0) the
network cannot tell the two apart at first, and fine-tuning drags the class towards the subject even with the prior.
The network is the base U-Net (`unet` or `unet_cond` with class labels) with num_classes K+1 (`network_config`), so a
DreamBooth run samples and exports like a base run of that kind; every parameter trains (the paper fine-tunes all of
them).

Registered as `model.name = "dreambooth"` (models/registry.py). The recipe's data, the subject's images (config
`data`) mixed with `num_class_images` class images drawn by the base with the run's `sample` section, lambda =
`prior_loss_weight`, is `train.dreambooth`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from diffusion_jax.models.adapted import BASES, AdaptedConfig, check_base, load_base
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.models.unet_cond_backbone import UNetCondBackboneConfig

IDENTIFIER_SEED = 0xDB   # numpy seed of the identifier's offset direction
# where each base keeps its (num_classes + 1, D) label embedding
EMBEDDING = {"unet": ("class_embed", "embedding"), "unet_cond": ("net", "class_embedding", "embedding")}


@dataclasses.dataclass(frozen=True)
class DreamBoothConfig(AdaptedConfig):
    """`model` section of `model.name="dreambooth"`; errors name keys as `model.<field>`."""

    name: str = "dreambooth"
    base: UNetConfig | UNetCondBackboneConfig | None = None   # the base run's model section (None: read from
    #   base_workdir/config.json)
    base_workdir: str | None = None      # the trained class-conditional run that is fine-tuned
    class_label: int = 0                 # the subject's class (its label in the base)
    num_class_images: int = 200          # class images the base draws for the prior (DreamBooth: 200-300)
    prior_loss_weight: float = 1.0       # lambda; 0 trains on the subject alone (no prior preservation)
    identifier_offset: float = 0.5       # [V]'s row = the class's + a fixed random direction of this length, relative
    #   to the mean distance between two labels (the rare token of "a [V] dog"); 0: a copy of the class's row

    ADAPTER = "DreamBooth"

    @property
    def num_classes(self) -> int:
        """The base's labels and the identifier (the null label is num_classes, as for every denoiser)."""
        return self.base.num_classes + 1

    @property
    def identifier(self) -> int:
        """The label [V] of the subject: the first one after the base's."""
        return self.base.num_classes

    @property
    def network_config(self) -> UNetConfig | UNetCondBackboneConfig:
        """The base's section with the identifier's label: the network a DreamBooth run trains and samples."""
        return dataclasses.replace(self.base, num_classes=self.num_classes)

    def validate(self) -> None:
        if self.name != "dreambooth":
            raise ValueError(f"model.name={self.name!r} does not name this config (dreambooth)")
        check_base(self.base, "DreamBooth")
        if self.base.num_classes is None:
            raise ValueError("model.base has num_classes=None: this DreamBooth binds the subject to a new class label, "
                             "so the base must be class-conditional (a text model's identifier would be a caption "
                             "token, which is not supported)")
        k = self.base.num_classes
        if isinstance(self.class_label, bool) or not isinstance(self.class_label, int) or not 0 <= self.class_label < k:
            raise ValueError(f"model.class_label={self.class_label!r} must be one of the base's labels 0..{k - 1}")
        n = self.num_class_images
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"model.num_class_images={n!r} must be a non-negative int")
        lam = self.prior_loss_weight
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < math.inf:
            raise ValueError(f"model.prior_loss_weight={lam!r} must be a finite number >= 0")
        off = self.identifier_offset
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not 0 <= off < math.inf:
            raise ValueError(f"model.identifier_offset={off!r} must be a finite number >= 0")
        if lam > 0 and n == 0:
            raise ValueError(f"model.prior_loss_weight={lam} needs class images: set model.num_class_images > 0 "
                             "(or prior_loss_weight=0 to train without prior preservation)")
        self.network_config.validate()


def DreamBoothUNet(config: DreamBoothConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The base's network with num_classes K + 1 (the registry's `build`)."""
    config.validate()
    return BASES[config.base.name][1](config.network_config, rngs=rngs)


def extend_embedding(table: jax.Array, class_label: int, offset: float = 0.0) -> jax.Array:
    """(K + 1, D) base label embedding (null last) -> (K + 2, D): rows 0..K-1, [V], the null. [V] is the class's row
    plus a fixed random direction (numpy seed IDENTIFIER_SEED) of length `offset` times the mean distance between
    two of the base's labels."""
    table = np.asarray(table)
    labels = table[:-1]
    mean_dist = np.sqrt(((labels[:, None] - labels[None]) ** 2).sum(-1)).sum() / max(len(labels) * (len(labels) - 1), 1)
    u = np.random.default_rng(IDENTIFIER_SEED).standard_normal(table.shape[1])
    identifier = table[class_label] + offset * mean_dist * u / np.linalg.norm(u)
    return jnp.asarray(np.concatenate([labels, identifier[None], table[-1:]]).astype(table.dtype))


def pretrained(config: DreamBoothConfig, params: dict, load_params) -> dict:
    """Fresh (K + 2)-label params -> the base run's EMA params with the identifier's row added."""
    path = EMBEDDING[config.base.name]
    flat = traverse_util.flatten_dict(params)
    k = config.base.num_classes
    fresh_base = {**flat, path: jax.ShapeDtypeStruct((k + 1, flat[path].shape[1]), flat[path].dtype)}
    base = traverse_util.flatten_dict(load_base(config.base_workdir, traverse_util.unflatten_dict(fresh_base),
                                                load_params))
    base[path] = extend_embedding(base[path], config.class_label, config.identifier_offset)
    return traverse_util.unflatten_dict(base)
