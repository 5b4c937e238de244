"""Reflow's pieces without a trained model: the pair file (data/pairs.py), the flow objective on a coupling, Liu et
al.'s straightness (eval/straightness.py) and train.init_from's fit check. The CLI round trip (draw pairs from a
trained flow, train a 2-rectified flow from its weights) is tests/e2e/test_reflow_cli.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config import load_experiment
from diffusion_jax.data import DataConfig, load_source
from diffusion_jax.data.pairs import load_pairs, save_pairs
from diffusion_jax.eval.straightness import straightness_of_trajectory
from diffusion_jax.objectives.flow import FlowLossConfig, flow_matching_loss
from diffusion_jax.process.flow import RectifiedFlow
from diffusion_jax.samplers.grid import Grid
from diffusion_jax.train.loop import init_params
from conftest import DIGITS


def _pairs(n=6, size=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, size, size, 1)).astype(np.float32),
            rng.uniform(-1, 1, (n, size, size, 1)).astype(np.float32), (np.arange(n) % 3).astype(np.int32))


def test_pair_file_round_trip_through_load_source(tmp_path):
    noise, images, labels = _pairs()
    path = save_pairs(str(tmp_path / "p.npz"), noise, images, labels, {"sampler": "flow_heun", "steps": 7})
    source = load_source(DataConfig(name="pairs", image_size=4, data_dir=path))
    assert source.num_examples == 6 and source.image_shape == (4, 4, 1) and source.num_classes == 3
    assert source.meta == {"sampler": "flow_heun", "steps": 7}
    got = source.get(np.array([4, 1]))
    np.testing.assert_array_equal(got["noise"], noise[[4, 1]])
    np.testing.assert_array_equal(got["image"], images[[4, 1]])
    np.testing.assert_array_equal(got["label"], [1, 1])
    assert not list(tmp_path.glob("*.tmp-*"))   # written through a temporary file, renamed


def test_bad_pair_files_and_settings_are_named(tmp_path):
    noise, images, labels = _pairs()
    with pytest.raises(FileNotFoundError, match="diffusion-jax reflow"):
        load_pairs(tmp_path / "missing.npz")
    np.savez(tmp_path / "images_only.npz", image=images)
    with pytest.raises(ValueError, match=r"lacks \['noise'\]"):
        load_pairs(tmp_path / "images_only.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz.*not a readable .npz"):
        load_pairs(tmp_path / "junk.npz")
    path = save_pairs(str(tmp_path / "p.npz"), noise, images, labels)
    with pytest.raises(ValueError, match="data.image_size=8 but the pairs .* are 4x4"):
        load_pairs(path, image_size=8)
    images[2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        save_pairs(str(tmp_path / "nan.npz"), noise, images, labels)
    assert not (tmp_path / "nan.npz").exists()
    from diffusion_jax.eval.evaluate import evaluation_data

    with pytest.raises(ValueError, match="do not name a readable source run"):   # written without meta
        evaluation_data(DataConfig(name="pairs", data_dir=path))
    with pytest.raises(ValueError, match="data.data_dir must be set to a pair file"):
        DataConfig(name="pairs").validate()
    with pytest.raises(ValueError, match="random_flip=True would mirror a pair's image but not its noise"):
        DataConfig(name="pairs", data_dir=path, random_flip=True).validate()
    with pytest.raises(ValueError, match="data.name='pairs' is a reflow coupling.*schedule.kind='flow'"):
        load_experiment(DIGITS, ["data.name=pairs", f"data.data_dir={path}"])


def test_the_flow_objective_trains_on_the_coupling_it_is_given():
    """A coupling x_0 = eps / 2 has the exact velocity v = eps - x_0 = eps / 2 = x_t / (1 + sigma): the loss of that
    velocity is 0 on the pairs, and of order 1 when the noise is drawn independently instead."""
    process = RectifiedFlow()
    eps = jax.random.normal(jax.random.PRNGKey(3), (16, 4, 4, 1))

    def exact(params, x_t, t_net, y=None, train=True, dropout_key=None):
        return x_t / (1.0 + (t_net / 1000.0)[:, None, None, None])

    cfg, key = FlowLossConfig(), jax.random.PRNGKey(0)
    paired, _ = flow_matching_loss(exact, process, cfg, None, {"image": 0.5 * eps, "noise": eps}, key)
    independent, _ = flow_matching_loss(exact, process, cfg, None, {"image": 0.5 * eps}, key)
    assert float(paired) < 1e-10 and float(independent) > 0.1
    with pytest.raises(ValueError, match=r"batch\['noise'\] must have the images' shape"):
        flow_matching_loss(exact, process, cfg, None, {"image": eps, "noise": eps[:, :2]}, key)


def _grid(alpha, sigma):
    f = lambda a: jnp.asarray(a, jnp.float32)
    return Grid(t=f(np.arange(len(alpha))[::-1]), alpha=f(alpha), sigma=f(sigma))


def test_straightness_is_zero_on_straight_paths_and_liu_s_integral_on_a_curved_one():
    K = 400
    tau = np.linspace(1.0, 0.0, K + 1)
    noise, data = np.random.default_rng(0).standard_normal((2, 3, 5))
    straight = (1 - tau)[:, None, None] * data + tau[:, None, None] * noise
    assert np.abs(straightness_of_trajectory(straight, _grid(1 - tau, tau))).max() < 1e-10
    # the same straight paths on a VP process (x = (alpha + sigma) z) at uneven levels: still 0
    t = np.linspace(0.999, 0.0, K + 1) ** 2
    alpha, sigma = np.cos(np.pi / 2 * t), np.sin(np.pi / 2 * t)
    tau_vp = sigma / (alpha + sigma)
    z = (1 - tau_vp)[:, None, None] * data + tau_vp[:, None, None] * noise
    s_vp = straightness_of_trajectory((alpha + sigma)[:, None, None] * z, _grid(alpha, sigma))
    assert np.abs(s_vp).max() < 1e-8   # float32 levels
    # z(tau) = tau^2 c: mean velocity c, speed 2 tau c, S = c^2 int_0^1 (1 - 2 tau)^2 dtau = c^2 / 3 per dimension
    c = np.array([[1.0, -2.0]])
    curved = (tau ** 2)[:, None, None] * c
    s = straightness_of_trajectory(curved, _grid(1 - tau, tau))
    np.testing.assert_allclose(s, np.mean(c ** 2) / 3, rtol=1e-4)
    with pytest.raises(ValueError, match=r"trajectory must be \(K \+ 1 = 401"):
        straightness_of_trajectory(curved[:-1], _grid(1 - tau, tau))


def test_init_from_must_fit_the_model_and_names_what_differs():
    fresh = {"conv": {"kernel": np.zeros((3, 3, 1, 8), np.float32), "bias": np.zeros((8,), np.float32)}}
    same = {"conv": {"kernel": np.ones((3, 3, 1, 8)), "bias": np.ones((8,))}}
    got = init_params("run", fresh, lambda run: same)
    assert got["conv"]["kernel"].dtype == np.float32 and float(got["conv"]["bias"][0]) == 1.0
    wider = {"conv": {"kernel": np.ones((3, 3, 1, 16)), "bias": np.ones((16,))}}
    with pytest.raises(ValueError, match=r"train.init_from='run' does not fit.*\['conv'\]\['bias'\] is shape \(16,\)"):
        init_params("run", fresh, lambda run: wider)
    extra = {**same, "head": {"kernel": np.ones((2,))}}
    with pytest.raises(ValueError, match=r"it has parameter \['head'\]\['kernel'\], which this model lacks"):
        init_params("run", fresh, lambda run: extra)

    def missing(run):
        raise FileNotFoundError(f"workdir {run!r} does not exist")
    with pytest.raises(FileNotFoundError, match="train.init_from='nowhere': workdir 'nowhere' does not exist"):
        init_params("nowhere", fresh, missing)

