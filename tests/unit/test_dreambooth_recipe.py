"""DreamBooth (models/dreambooth.py, train/dreambooth.py): the identifier's label starts as the class's (the network
answers [V] exactly as it answers the class, every other label and the null label as the base does), the epoch mix
that realises prior_loss_weight, the class-image cache, and the config's errors naming the key."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params
from flax import nnx

from diffusion_jax.data.pipeline import Batches
from diffusion_jax.models.dreambooth import DreamBoothConfig, DreamBoothUNet, extend_embedding, pretrained
from diffusion_jax.models.functional import abstract_params
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.train.dreambooth import CLASS_IMAGES, PriorSource, class_images, subject_repeats

BASE = UNetConfig(image_size=8, in_channels=1, channels=8, channel_mult=(1,), num_res_blocks=1,
                  attention_resolutions=(), num_groups=4, num_classes=3)


def test_identifier_starts_as_the_class_and_the_rest_as_the_base():
    base_graph, base_state = random_params(BASE, seed=1)
    base_params = nnx.to_pure_dict(base_state)
    config = DreamBoothConfig(base=BASE, base_workdir="base-run", class_label=1, identifier_offset=0.0)
    graphdef, abstract = abstract_params(lambda r: DreamBoothUNet(config, rngs=r))
    assert abstract["class_embed"]["embedding"].shape == (5, base_params["class_embed"]["embedding"].shape[1])
    params = pretrained(config, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract),
                        lambda workdir: base_params if workdir == "base-run" else None)
    base_net, net = nnx.merge(base_graph, base_state), nnx.merge(graphdef, params)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 1)), jnp.float32)
    t = jnp.array([10, 200, 500, 900])
    same = [(jnp.array([1, 1, 1, 1]), jnp.array([3, 3, 3, 3])),    # [V] (label 3) = the class (label 1)
            (jnp.array([0, 1, 2, 0]), jnp.array([0, 1, 2, 0])),    # the base's labels are unchanged
            (jnp.array([3, 3, 3, 3]), jnp.array([4, 4, 4, 4])),    # the null label moved from 3 to 4
            (None, None)]                                          # y=None is the null label in both
    for y_base, y_db in same:
        np.testing.assert_array_equal(np.asarray(net(x, t, y_db)), np.asarray(base_net(x, t, y_base)))
    assert not np.array_equal(np.asarray(net(x, t, jnp.array([3] * 4))), np.asarray(net(x, t, jnp.array([2] * 4))))
    emb = np.arange(8.0).reshape(4, 2)   # (K + 1, D), K = 3
    np.testing.assert_array_equal(extend_embedding(emb, 2), emb[[0, 1, 2, 2, 3]])
    moved = np.asarray(extend_embedding(emb, 2, offset=0.5))   # [V] = row 2 + 0.5 x the mean label distance
    np.testing.assert_array_equal(moved[[0, 1, 2, 4]], emb)
    mean_dist = np.mean([np.linalg.norm(emb[i] - emb[j]) for i in range(3) for j in range(3) if i != j])
    np.testing.assert_allclose(np.linalg.norm(moved[3] - emb[2]), 0.5 * mean_dist, rtol=1e-6)


def test_pretrained_refuses_a_base_of_another_shape():
    base_params = nnx.to_pure_dict(random_params(BASE)[1])
    other = DreamBoothConfig(base=UNetConfig(**{**BASE.__dict__, "channels": 16}), base_workdir="b", class_label=0)
    _, abstract = abstract_params(lambda r: DreamBoothUNet(other, rngs=r))
    with pytest.raises(ValueError, match="do not fit model.base"):
        pretrained(other, abstract, lambda workdir: base_params)


def test_the_epoch_mix_realises_prior_loss_weight():
    subject = np.full((5, 8, 8, 1), 0.5, np.float32)
    prior = np.full((200, 8, 8, 1), -0.5, np.float32)
    for lam, r, share in ((1.0, 40, 0.5), (0.5, 80, 2 / 3), (4.0, 10, 0.2)):
        assert subject_repeats(5, 200, lam) == r
        source = PriorSource(subject, prior, identifier=3, class_label=1, repeats=r, num_classes=4)
        batches = Batches(source, 25, seed=0)
        epoch = [batches.batch_at(s) for s in range(batches.steps_per_epoch)]
        labels = np.concatenate([b["label"] for b in epoch])
        images = np.concatenate([b["image"] for b in epoch])
        assert len(labels) == source.num_examples == 5 * r + 200
        assert np.mean(labels == 3) == pytest.approx(share)
        assert set(np.unique(labels)) == {1, 3}
        assert np.all(images[labels == 3] == 0.5) and np.all(images[labels == 1] == -0.5)
    assert subject_repeats(5, 200, 0.0) == 40   # without the prior: as many subject examples as class images


def test_class_images_of_another_config_are_refused(tmp_path):
    config = DreamBoothConfig(base=BASE, base_workdir="b", class_label=1, num_class_images=4)
    exp = types.SimpleNamespace(model=config)
    np.savez(tmp_path / CLASS_IMAGES, images=np.zeros((4, 8, 8, 1), np.float32), class_label=1)
    assert class_images(exp, str(tmp_path)).shape == (4, 8, 8, 1)   # the cached images, nothing drawn
    np.savez(tmp_path / CLASS_IMAGES, images=np.zeros((4, 8, 8, 1), np.float32), class_label=2)
    with pytest.raises(ValueError, match="class images of label 2 .* model.class_label=1"):
        class_images(exp, str(tmp_path))


@pytest.mark.parametrize("change, message", [
    (dict(class_label=3), r"model.class_label=3 must be one of the base's labels 0..2"),
    (dict(class_label=True), r"model.class_label=True"),
    (dict(num_class_images=-1), r"model.num_class_images=-1 must be a non-negative int"),
    (dict(prior_loss_weight=-1.0), r"model.prior_loss_weight=-1.0 must be a finite number >= 0"),
    (dict(identifier_offset=float("nan")), r"model.identifier_offset=nan must be a finite number >= 0"),
    (dict(num_class_images=0), r"model.prior_loss_weight=1.0 needs class images"),
    (dict(base=UNetConfig(**{**BASE.__dict__, "num_classes": None})), r"model.base has num_classes=None"),
    (dict(base=None, base_workdir=None), r"model.base_workdir is not set"),
])
def test_config_errors_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        DreamBoothConfig(**{"base": BASE, "base_workdir": "b", **change}).validate()
