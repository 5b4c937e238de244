"""Malformed configs and arrays fail at the public entry points with a ValueError / TypeError that names the
argument (or config key), never deep inside XLA and never with a silently wrong result.

Property tests (hypothesis) draw the malformed inputs; nothing here compiles a model: every check fires before
the first XLA computation (the loss and the sampler are only traced, through jax.eval_shape).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DIGITS
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from diffusion_jax import validate, viz
from diffusion_jax.config import Experiment, load_config_file, load_experiment
from diffusion_jax.data import ArraySource
from diffusion_jax.data.sources import load_fashion_mnist, load_folder
from diffusion_jax.eval.metrics.distances import feature_stats, kid
from diffusion_jax.eval.metrics.reference import evaluate_samples
from diffusion_jax.objectives.discrete import LossConfig, diffusion_loss
from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.samplers.registry import count_nfe, run_sampler

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ERRORS = (ValueError, TypeError)


# ---------------------------------------------------------------- (a) config overrides
def _leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


BASE = dict(_leaves(load_config_file(DIGITS)))
CHOICES = {"data.name", "data.split", "model.dtype", "schedule.name", "loss.prediction", "loss.weighting",
           "loss.loss_type", "optim.decay", "sample.sampler", "sample.spacing", "sample.variance"}
POSITIVE_INT = {"data.image_size", "model.image_size", "model.in_channels", "model.channels", "model.num_res_blocks",
                "model.num_heads", "model.num_groups", "model.num_classes", "model.out_channels", "model.context_dim",
                "schedule.num_timesteps", "train.steps", "train.batch_size", "train.log_every", "train.ckpt_every",
                "train.keep_checkpoints", "train.sample_num", "train.sample_steps", "sample.steps", "sample.num"}
NON_NEGATIVE_INT = {"data.seed", "optim.warmup_steps", "train.num_devices", "train.sample_every"}
POSITIVE_FLOAT = {"optim.learning_rate", "optim.eps", "loss.snr_gamma"}
NON_NEGATIVE_FLOAT = {"optim.weight_decay", "optim.grad_clip", "sample.eta", "sample.clip_denoised"}
UNIT_INTERVAL = {"optim.b1", "optim.b2", "train.ema_decay", "loss.cond_drop_prob", "model.dropout"}  # [0, 1)
OPEN_UNIT = {"schedule.beta_start", "schedule.beta_end"}                                             # (0, 1)
LINKED = {"data.image_size": "image_size", "model.image_size": "image_size"}  # one FieldReference in the config

finite = dict(allow_nan=False, allow_infinity=False)
WRONG_TYPE = {  # override texts of another type than the key's
    bool: st.sampled_from(["2", "maybe", "'yes'", "None", "1.5", "(1,)"]),
    int: st.sampled_from(["1.5", "'a'", "abc", "None", "True", "(1, 2)", "[1]", "{}"]),
    float: st.sampled_from(["'a'", "abc", "None", "True", "nan", "inf", "(1.0,)", "[0.5]", "{}"]),
}


def _bad_value(key):
    """A strategy of override texts that are invalid for `key` (wrong type, out of range, unknown choice)."""
    value = BASE[key]
    num = lambda s: s.map(repr)
    options = []
    if key in CHOICES:  # every valid choice is lower-case, without '?'
        options.append(st.text("abcdefghijklmnopqrstuvwxyz_ 0123456789", max_size=10).map(lambda t: t + "?")
                       | st.sampled_from(["", "None", "DDIM", "Linear", "EPS", "Train"]))
    if key in POSITIVE_INT:
        options.append(num(st.integers(max_value=0)))
    if key in NON_NEGATIVE_INT:
        options.append(num(st.integers(max_value=-1)))
    if key in POSITIVE_FLOAT:
        options.append(num(st.floats(max_value=0.0, **finite)))
    if key in NON_NEGATIVE_FLOAT:
        options.append(num(st.floats(max_value=-1e-9, **finite)))
    if key in UNIT_INTERVAL:
        options.append(num(st.floats(min_value=1.0, **finite) | st.floats(max_value=-1e-9, **finite)))
    if key in OPEN_UNIT:
        options.append(num(st.floats(min_value=1.0, **finite) | st.floats(max_value=0.0, **finite)))
    if key in ("model.channel_mult",):
        options.append(st.sampled_from(["()", "('a',)", "(0, 1)", "(1, -2)", "(1.5,)", "None"]))
    if key in ("model.attention_resolutions",):
        options.append(st.sampled_from(["(3,)", "(16, 5)", "('a',)", "(1.5,)"]))
    if key == "data.data_dir":
        options.append(st.sampled_from(["", "5", "1.5", "(1,)"]))
    if type(value) in WRONG_TYPE:
        options.append(WRONG_TYPE[type(value)])
    return st.one_of(options) if options else None


BAD_KEYS = sorted(k for k in BASE if _bad_value(k) is not None)
SECTIONS = {k.split(".")[0] for k in BASE}
UNKNOWN_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@st.composite
def bad_overrides(draw):
    """(override string, the key its error must name)."""
    kind = draw(st.sampled_from(["value", "value", "value", "unknown_leaf", "unknown_section", "no_equals"]))
    if kind == "value":
        key = draw(st.sampled_from(BAD_KEYS))
        return f"{key}={draw(_bad_value(key))}", key
    if kind == "unknown_leaf":
        section = draw(st.sampled_from(["data", "model", "schedule", "loss", "optim", "train", "sample"]))
        key = f"{section}.{draw(UNKNOWN_NAME.filter(lambda n: f'{section}.{n}' not in BASE))}"
    elif kind == "unknown_section":
        key = f"{draw(UNKNOWN_NAME.filter(lambda n: n not in SECTIONS))}.steps"
    else:
        key = draw(st.sampled_from(BAD_KEYS))
        return key, key
    return f"{key}={draw(st.sampled_from(['1', '0.5', 'x']))}", key


@SETTINGS
@given(bad_overrides())
def test_malformed_config_overrides_name_the_key(case):
    override, key = case
    with pytest.raises(ValueError) as e:
        load_experiment(DIGITS, [override])
    assert key in str(e.value) or LINKED.get(key, "\0") in str(e.value), (override, str(e.value))


@pytest.mark.parametrize("section,key,value", [
    ("optim", "learning_rate", "abc"), ("train", "ema_decay", None), ("optim", "b1", 2.0), ("optim", "grad_clip", -1.0),
    ("optim", "warmup_steps", -1), ("optim", "weight_decay", -0.1), ("schedule", "name", "quadratic"),
    ("schedule", "beta_end", 1.5), ("sample", "clip_denoised", -1.0), ("sample", "eta", -0.5),
    ("train", "num_devices", -2), ("loss", "snr_gamma", "5"), ("model", "dropout", float("nan")),
    ("data", "random_flip", "yes"), ("train", "steps", 10.0), ("model", "channel_mult", [1, "2"]),
    ("train", "batch_size", 10), ("schedule", "beta_start", 1.5)])
def test_config_dict_values_are_type_and_range_checked(section, key, value):
    """Values from a config file or a workdir's config.json skip the override parser; validate still names them."""
    raw = load_config_file(DIGITS).to_dict()
    raw[section][key] = value
    if (section, key) == ("train", "batch_size"):
        raw["train"]["num_devices"] = 4              # 10 examples do not split over 4 devices
    with pytest.raises(ValueError, match=rf"{section}\.{key}"):
        Experiment.from_config(raw)


def test_config_seed_and_sections():
    raw = load_config_file(DIGITS).to_dict()
    for seed in ("x", 1.5, None):
        with pytest.raises(ValueError, match="'seed'"):
            Experiment.from_config(dict(raw, seed=seed))
    with pytest.raises(ValueError, match="section 'optim'"):
        Experiment.from_config(dict(raw, optim=3))


# ---------------------------------------------------------------- (b) malformed arrays
VALID = (2, 8, 8, 1)


@st.composite
def malformed(draw, kinds, shape=VALID, allowed_c=(1,)):
    """(kind, value): an image batch like `shape` (float32 in [-1, 1]) broken in one way drawn from `kinds`."""
    kind = draw(st.sampled_from(kinds))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    i = draw(st.integers(0, x.size - 1))
    if kind == "rank":
        dims = draw(st.lists(st.integers(1, 3), max_size=5).filter(lambda d: len(d) != len(shape)))
        return kind, np.zeros(dims, np.float32)
    if kind == "channels":
        c = draw(st.integers(1, 6).filter(lambda c: c not in allowed_c))
        return kind, np.zeros(shape[:-1] + (c,), np.float32)
    if kind == "size":
        hw = draw(st.tuples(st.integers(1, 12), st.integers(1, 12)).filter(lambda s: s != shape[1:3]))
        return kind, np.zeros((shape[0], *hw, shape[3]), np.float32)
    if kind == "empty":
        axis = draw(st.integers(0, 3))
        return kind, np.zeros(shape[:axis] + (0,) + shape[axis + 1:], np.float32)
    if kind == "nonfinite":
        x.flat[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return kind, x
    if kind == "range":
        outside = st.floats(1.0, 1e6, exclude_min=True, width=32) | st.floats(-1e6, -1.0, exclude_max=True, width=32)
        x.flat[i] = draw(outside)
        return kind, x
    if kind == "dtype":
        return kind, x.astype(draw(st.sampled_from([np.int32, np.int64, np.bool_, np.complex64, np.str_])))
    return kind, draw(st.sampled_from([None, "abc", {"image": 1}, [[1.0], [1.0, 2.0]], np.array([None, 1])]))


ALL = ["rank", "channels", "empty", "nonfinite", "range", "dtype", "nonarray"]


def _raises_naming(fn, name):
    with pytest.raises(ERRORS) as e:
        fn()
    assert name in str(e.value), str(e.value)


@SETTINGS
@given(malformed([k for k in ALL if k not in ("range", "channels")]))
def test_viz_rejects_malformed_images(tmp_path_factory, case):
    kind, x = case
    if kind == "empty" and x.shape[0] == 0:
        assert viz.to_uint8(x).shape == x.shape   # no images is a valid input to to_uint8 ...
        _raises_naming(lambda: viz.make_grid(x), "images")  # ... but not to a grid
        return
    _raises_naming(lambda: viz.to_uint8(x), "images")


@SETTINGS
@given(malformed(["channels"], allowed_c=(1, 3, 4)))
def test_save_grid_rejects_channel_counts_png_cannot_hold(tmp_path_factory, case):
    path = str(tmp_path_factory.mktemp("grid") / "g.png")
    _raises_naming(lambda: viz.save_grid(case[1], path), "images")
    assert not os.path.exists(path)


@SETTINGS
@given(malformed([k for k in ALL if k != "channels"]))
def test_array_source_rejects_malformed_images(case):
    _raises_naming(lambda: ArraySource(case[1]), "images")


@pytest.mark.parametrize("labels", [np.zeros(3, np.int64), np.zeros((2, 1), np.int64), np.zeros(2, np.float32),
                                    np.array([0, -1]), np.array([0, 10]), np.array(["a", "b"]), [[0], [1, 2]]])
def test_array_source_rejects_malformed_labels(labels):
    _raises_naming(lambda: ArraySource(np.zeros(VALID, np.float32), labels, num_classes=10), "labels")


class _Extractor:
    name = "stub"

    def features(self, images):
        return np.random.default_rng(0).normal(size=(len(images), 4))


@SETTINGS
@given(malformed([k for k in ALL if k != "channels"]))
def test_evaluate_samples_rejects_malformed_images(case):
    real = np.random.default_rng(1).normal(size=(5, 4))
    _raises_naming(lambda: evaluate_samples(case[1], _Extractor(), real), "images")


@pytest.mark.parametrize("kind", ["nan", "rank", "str"])
def test_feature_distances_reject_malformed_features(kind):
    feats = np.random.default_rng(1).normal(size=(5, 4))
    bad = {"nan": np.where(np.eye(5, 4) > 0, np.nan, feats), "rank": feats[None], "str": "abc"}[kind]
    _raises_naming(lambda: feature_stats(bad), "feats")
    _raises_naming(lambda: kid(feats, bad), "feats_b")
    _raises_naming(lambda: evaluate_samples(np.zeros(VALID, np.float32), _Extractor(), bad), "real_feats")


@pytest.fixture(scope="module")
def extractors():
    from flax import nnx

    from diffusion_jax.eval.metrics.classifier import FeatureExtractor, _make_model
    from diffusion_jax.eval.metrics.inception import InceptionFeatures
    from diffusion_jax.models.functional import split_params

    graphdef, params = split_params(_make_model(VALID[1:], 10, nnx.Rngs(0)))
    return FeatureExtractor("classifier-test", graphdef, params, VALID[1:], 10), InceptionFeatures({})


@SETTINGS
@given(case=malformed(["rank", "channels", "size", "nonfinite", "range", "dtype", "nonarray"]))
def test_feature_extractors_reject_malformed_images(extractors, case):
    kind, x = case
    classifier, inception = extractors
    _raises_naming(lambda: classifier.features(x), "images")
    if kind not in ("size", "channels") or x.shape[-1] not in (1, 3):   # Inception resizes; takes 1 or 3 channels
        _raises_naming(lambda: inception.features(x), "images")


def _toy_apply(params, xt, t, y=None, train=False, dropout_key=None):  # a one-channel "model"
    return jnp.zeros(xt.shape[:-1] + (1,), xt.dtype)


@SETTINGS
@given(malformed(["rank", "channels", "empty", "nonfinite", "dtype", "nonarray"]))
def test_diffusion_loss_rejects_malformed_batches(case):
    schedule = make_schedule("linear", 10)
    loss = lambda batch: jax.eval_shape(lambda k: diffusion_loss(_toy_apply, schedule, LossConfig(), {}, batch, k),
                                        jax.random.PRNGKey(0))
    _raises_naming(lambda: loss({"image": case[1]}), "batch['image']")


def test_diffusion_loss_checks_labels_and_the_model_output():
    schedule, key = make_schedule("linear", 10), jax.random.PRNGKey(0)
    run = lambda batch, **kw: jax.eval_shape(
        lambda k: diffusion_loss(_toy_apply, schedule, LossConfig(), {}, batch, k, **kw), key)
    x = np.zeros(VALID, np.float32)
    _raises_naming(lambda: run({"img": x}), "'image'")
    _raises_naming(lambda: run({"image": x, "label": np.zeros(3, np.int32)}, num_classes=10), "batch['label']")
    _raises_naming(lambda: run({"image": x, "label": np.zeros(2, np.float32)}, num_classes=10), "batch['label']")
    _raises_naming(lambda: run({"image": x}, learn_sigma=True), "apply_fn returned shape")   # 1 channel, not 2
    # Under jit the batch is a tracer: its shape is checked, its values are not (they are unknown at trace time).
    jax.eval_shape(lambda b, k: diffusion_loss(_toy_apply, schedule, LossConfig(), {}, b, k), {"image": x}, key)
    with pytest.raises(ValueError, match=r"batch\['image'\]"):
        jax.eval_shape(lambda b, k: diffusion_loss(_toy_apply, schedule, LossConfig(), {}, b, k), {"image": x[0]}, key)


@SETTINGS
@given(malformed(["rank", "nonfinite", "dtype", "nonarray"]))
def test_run_sampler_rejects_malformed_x_T(case):
    assume(case[1] is not None)  # no x_T: run_sampler draws one
    schedule = make_schedule("linear", 10)
    for name in ("ddim", "euler"):
        _raises_naming(lambda: jax.eval_shape(lambda: run_sampler(
            name, lambda x, t: x, schedule, jax.random.PRNGKey(0), VALID, steps=2, x_T=case[1])), "x_T")


@SETTINGS
@given(st.one_of(st.lists(st.integers(-3, 0), min_size=1, max_size=4), st.just([]),
                 st.lists(st.floats(0.5, 3.5).filter(lambda f: f != int(f)), min_size=1, max_size=3).map(tuple),
                 st.sampled_from([None, 4, "abc", (2, True)])))
def test_run_sampler_rejects_malformed_shapes(shape):
    schedule = make_schedule("linear", 10)
    _raises_naming(lambda: jax.eval_shape(lambda: run_sampler(
        "euler", lambda x, t: x, schedule, jax.random.PRNGKey(0), shape, steps=2)), "shape")


def test_sampler_options_and_steps_name_the_problem():
    schedule = make_schedule("linear", 100)
    with pytest.raises(ValueError, match=r"sampler.steps: 'pndm'.*at least 4 steps, got 3"):
        count_nfe("pndm", schedule, 3)
    with pytest.raises(ValueError, match="no option 'etaa'"):
        count_nfe("ddim", schedule, 3, options={"etaa": 0.5})
    with pytest.raises(ValueError, match="sampler.steps"):
        count_nfe("dpmpp_2m", schedule, 0)
    with pytest.raises(TypeError, match="options must be a dict"):
        run_sampler("euler", lambda x, t: x, schedule, None, (1, 2), steps=2, options=["eta"])
    with pytest.raises(ValueError, match="sampler.key"):
        run_sampler("euler", lambda x, t: x, schedule, None, (1, 2), steps=2)
    # A traced x_T (inside jit) gets its shape checked and nothing else.
    out = jax.eval_shape(lambda x: run_sampler("euler", lambda x, t: x, schedule, None, (2, 3), steps=2, x_T=x)[0],
                         jax.ShapeDtypeStruct((2, 3), jnp.float32))
    assert out.shape == (2, 3)
    with pytest.raises(ValueError, match="x_T must be"):
        jax.eval_shape(lambda x: run_sampler("euler", lambda x, t: x, schedule, None, (2, 3), steps=2, x_T=x),
                       jax.ShapeDtypeStruct((3, 3), jnp.float32))


def test_check_images_on_tracers_checks_only_static_properties():
    spec = jax.ShapeDtypeStruct((2, 4, 4, 3), jnp.float32)
    jax.eval_shape(lambda x: validate.check_images(x, "images", channels=3), spec)
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, 1\)"):
        jax.eval_shape(lambda x: validate.check_images(x, "images", channels=1), spec)
    with pytest.raises(TypeError, match="dtype int32"):
        jax.eval_shape(lambda x: validate.check_images(x, "images"), jax.ShapeDtypeStruct((2, 4, 4, 3), jnp.int32))


def test_schedule_arguments_name_the_key():
    for kwargs, key in [(dict(name="quadratic"), "schedule.name"), (dict(num_timesteps=0), "schedule.num_timesteps"),
                        (dict(num_timesteps=True), "schedule.num_timesteps"), (dict(beta_start=0.0), "beta_start"),
                        (dict(beta_end=1.0), "schedule.beta_end"), (dict(beta_end=float("nan")), "schedule.beta_end"),
                        (dict(beta_start=0.03), "schedule.beta_start=0.03 must be <= schedule.beta_end=0.02")]:
        with pytest.raises(ValueError, match=key):
            make_schedule(**kwargs)


# ---------------------------------------------------------------- dataset paths
def test_folder_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.*does not exist"):
        load_folder(str(tmp_path / "missing"))
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="file.png.*not a directory"):
        load_folder(str(tmp_path / "file.png"))
    with pytest.raises(TypeError, match="data.data_dir"):
        load_folder(None)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no images found under data.data_dir=.*empty"):
        load_folder(str(tmp_path / "empty"))
    good = tmp_path / "imgs"
    good.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(good / "a.png")
    with pytest.raises(ValueError, match="data.image_size"):
        load_folder(str(good), image_size=0)
    (good / "b.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match=r"cannot decode image file .*b\.png"):
        load_folder(str(good), image_size=4)


def test_fashion_mnist_missing_directory_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz.*data\.data_dir"):
        load_fashion_mnist("train", 28, str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="data.data_dir"):
        load_fashion_mnist("train", 28, 5)


def test_well_formed_inputs_still_pass(tmp_path):
    u8 = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(viz.to_uint8(u8), u8)  # uint8 images are already in [0, 255]
    assert os.path.exists(viz.save_grid(u8 / np.float32(127.5) - 1, str(tmp_path / "g.png"), nrow=2))
    src = ArraySource(np.zeros(VALID, np.float64), np.array([0, 3]), num_classes=4)
    assert src.get(np.array([1]))["image"].dtype == np.float32 and src.num_classes == 4
    assert validate.check_shape([2, np.int64(3)]) == (2, 3)
