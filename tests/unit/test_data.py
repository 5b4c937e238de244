"""Tests for diffusion_jax.data: sources, config validation, deterministic batching."""
import gzip
import os
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import ArraySource, Batches, DataConfig, Source, center_crop_resize, load_source, read_idx
from diffusion_jax.data.sources import FASHION_MNIST_DIR

HAVE_FASHION = os.path.exists(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR} (apt-get install -y dataset-fashion-mnist)")


# ---------------------------------------------------------------- digits
def test_digits_shapes_range_labels_and_disjoint_splits():
    train = load_source(DataConfig(name="digits", image_size=16))
    test = load_source(DataConfig(name="digits", image_size=16, split="test"))
    assert isinstance(train, Source)
    assert (train.num_examples, test.num_examples) == (1617, 180)
    assert train.image_shape == (16, 16, 1) and train.num_classes == 10
    b = train.get(np.arange(train.num_examples))
    assert b["image"].shape == (1617, 16, 16, 1) and b["image"].dtype == np.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["image"].max() > 0.9
    assert b["label"].dtype == np.int32 and set(np.unique(b["label"])) == set(range(10))
    # Disjoint and complete: the documented hold-out rule, checked against the raw 8x8 images.
    from sklearn.datasets import load_digits
    full = (load_digits().images / 8.0 - 1.0).astype(np.float32)[..., None]
    perm = np.random.default_rng(0).permutation(1797)
    te_idx, tr_idx = np.sort(perm[:180]), np.sort(perm[180:])
    assert not set(te_idx) & set(tr_idx) and len(set(te_idx) | set(tr_idx)) == 1797
    for split, idx in (("train", tr_idx), ("test", te_idx)):
        s8 = load_source(DataConfig(image_size=8, split=split))
        np.testing.assert_array_equal(s8.get(np.arange(len(idx)))["image"], full[idx])
    np.testing.assert_array_equal(test.get(np.arange(180))["label"], load_digits().target[te_idx])
    for bad in ([train.num_examples], [-1]):
        with pytest.raises(IndexError):
            train.get(np.array(bad))


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, needle", [
    (dict(image_size=0), "data.image_size must be a positive int, got 0"),
    (dict(image_size=True), "data.image_size"),
    (dict(name="foo"), "data.name='foo' unknown; choose from"),
    (dict(name="tfds:"), "data.name"),
    (dict(split="validation"), "data.split='validation'"),
    (dict(name="folder"), "data.data_dir must be set"),
    (dict(seed=-1), "data.seed"),
    (dict(random_flip="yes"), "data.random_flip"),
])
def test_config_validation_names_the_key(kwargs, needle):
    with pytest.raises(ValueError) as e:
        DataConfig(**kwargs).validate()
    assert needle in str(e.value)


# ---------------------------------------------------------------- fashion-mnist
@needs_fashion
def test_fashion_mnist_counts_and_shapes():
    train = load_source(DataConfig(name="fashion_mnist", image_size=28))
    test = load_source(DataConfig(name="fashion_mnist", image_size=28, split="test"))
    assert (train.num_examples, test.num_examples) == (60000, 10000)
    assert train.image_shape == (28, 28, 1) and train.num_classes == 10
    b = test.get(np.arange(10000))
    assert b["image"].dtype == np.float32 and b["image"].min() == -1.0 and b["image"].max() == 1.0
    np.testing.assert_array_equal(np.bincount(b["label"]), np.full(10, 1000))
    raw = read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    np.testing.assert_allclose(b["image"][5, ..., 0], raw[5] / 127.5 - 1, atol=1e-6)


@needs_fashion
def test_fashion_mnist_resized():
    s = load_source(DataConfig(name="fashion_mnist", image_size=32, split="test"))
    b = s.get(np.arange(8))
    assert s.image_shape == (32, 32, 1) and b["image"].shape == (8, 32, 32, 1)
    assert b["image"].min() >= -1 and b["image"].max() <= 1


def test_fashion_mnist_missing_dir_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_source(DataConfig(name="fashion_mnist", data_dir=str(tmp_path / "nope")))
    msg = str(e.value)
    assert str(tmp_path / "nope") in msg and "apt-get install -y dataset-fashion-mnist" in msg
    assert "data.data_dir" in msg


def test_idx_corrupt_files_named(tmp_path):
    bad_magic = tmp_path / "bad.gz"
    with gzip.open(bad_magic, "wb") as f:
        f.write(b"\x00\x00\x09\x03" + b"\x00" * 20)
    with pytest.raises(ValueError, match="bad.gz.*magic"):
        read_idx(str(bad_magic))
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + np.array([2, 3, 3], ">u4").tobytes() + b"\x01" * 5)
    with pytest.raises(ValueError, match="short.gz"):
        read_idx(str(truncated))
    not_gzip = tmp_path / "notgz.gz"
    not_gzip.write_bytes(b"garbage!")
    with pytest.raises(ValueError, match="notgz.gz"):
        read_idx(str(not_gzip))
    good = tmp_path / "ok"
    good.write_bytes(b"\x00\x00\x08\x02" + np.array([2, 3], ">u4").tobytes() + bytes(range(6)))
    np.testing.assert_array_equal(read_idx(str(good)), np.arange(6).reshape(2, 3))


# ---------------------------------------------------------------- folder
def _write_png(path, rng, size=(20, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def test_folder_unlabelled(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        _write_png(tmp_path / f"img{i}.png", rng, mode="L" if i == 0 else "RGB")
    _write_png(tmp_path / "nested" / "deep" / "x.png", rng)
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_source(DataConfig(name="folder", data_dir=str(tmp_path), image_size=8))
    assert s.num_examples == 6 and s.image_shape == (8, 8, 3) and s.num_classes is None
    b = s.get(np.arange(6))
    assert set(b) == {"image"} and b["image"].dtype == np.float32
    assert -1 <= b["image"].min() and b["image"].max() <= 1


def test_folder_class_subfolders(tmp_path):
    rng = np.random.default_rng(1)
    for cls, n in (("dogs", 2), ("cats", 3), ("birds", 1)):
        for i in range(n):
            _write_png(tmp_path / cls / f"{i}.png", rng)
    (tmp_path / "cats" / "sub").mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "cats" / "sub" / "j.jpg")  # nested
    s = load_source(DataConfig(name="folder", data_dir=str(tmp_path), image_size=4))
    assert s.num_classes == 3 and s.class_names == ("birds", "cats", "dogs")
    labels = s.get(np.arange(s.num_examples))["label"]
    np.testing.assert_array_equal(np.bincount(labels), [1, 4, 2])


def test_folder_center_crop(tmp_path):
    img = np.zeros((10, 30, 3), np.uint8)  # 30 wide, 10 high: centre square is columns 10..19
    img[:, 10:20] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    b = load_source(DataConfig(name="folder", data_dir=str(tmp_path), image_size=10)).get(np.array([0]))
    np.testing.assert_allclose(b["image"], 1.0)


def test_folder_grayscale(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey, "L").save(tmp_path / "a.png")
    s = load_source(DataConfig(name="folder", data_dir=str(tmp_path), image_size=8, grayscale=True))
    assert s.image_shape == (8, 8, 1)
    np.testing.assert_allclose(s.get(np.array([0]))["image"][0, ..., 0], grey / 127.5 - 1, atol=1e-6)
    assert load_source(DataConfig(name="folder", data_dir=str(tmp_path), image_size=8)).image_shape == (8, 8, 3)
    with pytest.raises(ValueError, match="data.grayscale=True reads a folder's images as one channel; "
                                         "data.name='digits'"):
        DataConfig(name="digits", grayscale=True).validate()
    with pytest.raises(ValueError, match="data.grayscale must be a bool"):
        DataConfig(name="folder", data_dir="x", grayscale="yes").validate()


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_source(DataConfig(name="folder", data_dir=str(tmp_path / "does_not_exist")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images found.*\.png.*\.jpg"):
        load_source(DataConfig(name="folder", data_dir=str(tmp_path / "empty")))
    bad = tmp_path / "bad"
    _write_png(bad / "good.png", np.random.default_rng(0))
    (bad / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_source(DataConfig(name="folder", data_dir=str(bad)))


# ---------------------------------------------------------------- batches
def _toy(n=10):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 3, 1), np.uint8)
    images[:, :, 0] = 255  # left column marks orientation
    return ArraySource(images, np.arange(n))


def test_batches_determinism_and_epoch_coverage():
    src = _toy(10)
    a, b = Batches(src, 3, seed=5), Batches(src, 3, seed=5)
    assert a.steps_per_epoch == 3
    for step in (0, 7, 2, 100, 7):
        np.testing.assert_array_equal(a.batch_at(step)["label"], b.batch_at(step)["label"])
        np.testing.assert_array_equal(a.batch_at(step)["image"], b.batch_at(step)["image"])
    for epoch in range(3):
        labels = np.concatenate([a.batch_at(epoch * 3 + i)["label"] for i in range(3)])
        perm = np.random.default_rng([5, epoch]).permutation(10)
        np.testing.assert_array_equal(labels, perm[:9])  # drop remainder: each example at most once
        assert len(set(labels.tolist())) == 9
    c = Batches(_toy(12), 4, seed=0)
    for epoch in range(2):
        labels = np.concatenate([c.batch_at(epoch * 3 + i)["label"] for i in range(3)])
        np.testing.assert_array_equal(np.sort(labels), np.arange(12))  # exactly once per epoch


def test_iterate_matches_batch_at():
    bt = Batches(load_source(DataConfig()), 64, seed=1, random_flip=True)
    it = bt.iterate(start_step=23)
    for k in range(23, 30):
        got, want = next(it), bt.batch_at(k)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    it.close()


def test_flips_deterministic():
    src = _toy(10)
    a, b = Batches(src, 10, seed=3, random_flip=True), Batches(src, 10, seed=3, random_flip=True)
    flipped = []
    for step in range(4):
        x = a.batch_at(step)["image"]
        np.testing.assert_array_equal(x, b.batch_at(step)["image"])
        flipped.append(x[:, 0, -1, 0] == 1.0)  # marker moved from left to right column
        left = x[:, 0, 0, 0] == 1.0
        assert np.all(flipped[-1] ^ left)
    flipped = np.concatenate(flipped)
    assert 0 < flipped.sum() < len(flipped)
    plain = Batches(src, 10, seed=3).batch_at(0)["image"]
    assert np.all(plain[:, 0, 0, 0] == 1.0)


def test_batches_errors():
    src = _toy(10)
    for bad in (11, 0):
        with pytest.raises(ValueError, match="train.batch_size"):
            Batches(src, bad)
    with pytest.raises(ValueError, match="step"):
        Batches(src, 2).batch_at(-1)


# ---------------------------------------------------------------- tfds
def test_tfds_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes `import` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'diffusion_jax\[tfds\]'"):
        load_source(DataConfig(name="tfds:mnist"))


def _build_tiny_tfds(tfds, data_dir, name="tiny_images"):
    """Write a 2-split array_record TFDS dataset of PNG-encoded 12x10 RGB images (no TensorFlow needed)."""
    import io

    class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(7), "test": self._generate_examples(3)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(n)
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
                yield i, {"image": buf.getvalue(), "label": i % 3}

    TinyImages.name = name
    TinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_prepared_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets", reason="optional: pip install 'diffusion_jax[tfds]'")
    _build_tiny_tfds(tfds, tmp_path)
    s = load_source(DataConfig(name="tfds:tiny_images", data_dir=str(tmp_path), image_size=8))
    assert s.num_examples == 7 and s.image_shape == (8, 8, 3) and s.num_classes == 3
    b = s.get(np.array([0, 4, 6]))
    assert b["image"].shape == (3, 8, 8, 3) and b["image"].dtype == np.float32
    assert -1 <= b["image"].min() and b["image"].max() <= 1
    everything = s.get(np.arange(7))  # TFDS shuffles at prepare time: compare as sets
    np.testing.assert_array_equal(np.bincount(everything["label"]), [3, 2, 2])
    rng, expected = np.random.default_rng(7), {}
    for i in range(7):
        im = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
        expected[center_crop_resize(im, 8).tobytes()] = i % 3
    got = np.rint((everything["image"] + 1) * 127.5).astype(np.uint8)
    assert [expected[g.tobytes()] for g in got] == everything["label"].tolist()
    assert load_source(DataConfig(name="tfds:tiny_images", data_dir=str(tmp_path), split="test")).num_examples == 3
    bt = Batches(s, 3, seed=0, random_flip=True)
    np.testing.assert_array_equal(next(bt.iterate(2))["image"], bt.batch_at(2)["image"])


def test_tfds_not_prepared_error(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="optional: pip install 'diffusion_jax[tfds]'")
    for name in ("mnist", "no_such_dataset_xyz"):
        with pytest.raises(FileNotFoundError) as e:
            load_source(DataConfig(name=f"tfds:{name}", data_dir=str(tmp_path)))
        assert str(tmp_path) in str(e.value) and "offline" in str(e.value)
