"""A diffusers UNet2DModel (a DDPMPipeline at diffusers' default UNet2DModel options, built tiny and random here: no
downloads) converted into a training workdir gives diffusers' DDIM samples from the same x_T, and `diffusion-jax
sample` runs on it."""
import functools
import json

import jax
import numpy as np
import pytest
from harness import CHEAP_COMPILE, assert_trees_equal, diffusers_loop, nchw, need, nhwc, random_torch_model, to_torch

from diffusion_jax.cli.main import main
from diffusion_jax.cli.pipelines import detect_layout
from diffusion_jax.config import build_schedule
from diffusion_jax.inference.sampling import network_denoise_fn
from diffusion_jax.models.functional import make_apply_fn
from diffusion_jax.samplers import run_sampler
from diffusion_jax.train.checkpoint import load_trained
from diffusion_jax.train.ddpm_import import convert_unet2d

_, diffusers = need("torch", "diffusers")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def ddpm_folders(tmp_path_factory):
    """(google-layout folder, DDPMPipeline folder, the diffusers UNet, the DDPMScheduler) of one tiny random model."""
    unet = random_torch_model(  # every tensor perturbed, so that zero biases / unit norm scales are exercised too
        diffusers.UNet2DModel, seed=0, perturb=0.1,
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=16)   # diffusers' defaults otherwise (cos first, shift 0, padding 1,
    #   eps 1e-5: what diffusers' unconditional training example saves); the DDPM variant: tests/parity/test_unet.py
    scheduler = diffusers.DDPMScheduler(beta_schedule="linear", variance_type="fixed_large", clip_sample=True)
    root = tmp_path_factory.mktemp("ddpm")
    google = root / "google"
    unet.save_pretrained(google)                # config.json + diffusion_pytorch_model.safetensors
    scheduler.save_pretrained(google)           # scheduler_config.json, beside them
    pipeline = root / "pipeline"
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(pipeline)
    return str(google), str(pipeline), unet, scheduler


@pytest.fixture(scope="module")
def google_workdir(ddpm_folders, tmp_path_factory):
    """(the workdir converted from the google-layout folder, its Experiment)."""
    workdir = tmp_path_factory.mktemp("converted") / "workdir"
    return workdir, convert_unet2d(ddpm_folders[0], str(workdir))


def _ddim_reference(unet, scheduler, x_T, steps, spacing, clip):
    """diffusers' DDIM (eta 0; x0-hat clipped to [-clip, clip] with eps re-derived from it, as ours, or not clipped)
    from x_T (N, C, H, W) -> (x_0 (N, C, H, W), timesteps)."""
    ddim = diffusers.DDIMScheduler.from_config(scheduler.config, clip_sample=bool(clip), clip_sample_range=clip or 1.0,
                                               timestep_spacing=spacing, steps_offset=0)
    ddim.set_timesteps(steps)
    x = diffusers_loop(ddim, lambda x, t: unet(x, t).sample, to_torch(x_T),
                       step_kwargs=lambda i, t: dict(eta=0.0, use_clipped_model_output=True))[-1]
    return x, ddim.timesteps.numpy()


def test_converted_workdir_gives_diffusers_ddim_samples(ddpm_folders, google_workdir, tmp_path, capsys):
    _, _, unet, scheduler = ddpm_folders
    workdir, exp = google_workdir
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json", "imported_from.json"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved == json.loads(json.dumps(exp.to_dict()))
    assert (exp.model.image_size, exp.model.channel_mult, exp.model.attention_resolutions) == (8, (1, 2), (4,))
    assert (exp.schedule.name, exp.schedule.num_timesteps, exp.loss.prediction) == ("linear", 1000, "eps")
    assert (exp.sample.variance, exp.sample.clip_denoised, exp.sample.spacing) == ("fixed_large", 1.0, "leading")
    assert (exp.data.name, exp.data.image_size, exp.data.data_dir) == ("folder", 8, str(workdir / "data"))

    exp2, graphdef, params, step = load_trained(str(workdir))   # what sample / compare restore
    assert step == 0 and exp2 == exp
    apply = make_apply_fn(graphdef)
    schedule = build_schedule(exp.schedule)
    x_T = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    # the run's sampling settings (clip 1, "leading") and no clipping with "trailing"; a random network's x0-hat is
    # far outside [-1, 1], so the unclipped samples are large and compared relative to their size
    for spacing, clip in (("leading", exp.sample.clip_denoised), ("trailing", None)):
        want, timesteps = _ddim_reference(unet, scheduler, x_T, 5, spacing, clip)
        assert timesteps.tolist() == ([800, 600, 400, 200, 0] if spacing == "leading" else [999, 799, 599, 399, 199])

        @functools.partial(jax.jit, compiler_options=CHEAP_COMPILE)
        def ddim(params, x_T):
            denoise = network_denoise_fn(apply, params, None, channels=3)
            return run_sampler("ddim", denoise, schedule, jax.random.PRNGKey(0), x_T.shape, steps=5,
                               spacing=spacing, clip_denoised=clip, options={"eta": 0.0}, x_T=x_T)

        got, info = ddim(params, nhwc(x_T))
        assert int(info["nfe"]) == 5
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(want).max() > 0.5 and (clip is None or np.mean(np.abs(want) < 0.999) > 0.1)  # not all clipped
        np.testing.assert_allclose(nchw(got) / scale, want / scale, atol=1e-5 if clip
                                   is None else 1e-4, rtol=1e-4)

    # the command line samples from it as from a trained run
    assert main(["sample", "--workdir", str(workdir), "--steps", "3", "--num", "2", "--out",
                 str(tmp_path / "s.png"), "--npz", str(tmp_path / "s.npz")]) == 0
    out = capsys.readouterr().out
    assert "NFE 3" in out and (tmp_path / "s.png").exists()
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 8, 8, 3)


def test_pipeline_layout_through_the_cli(ddpm_folders, google_workdir, tmp_path, capsys):
    google, pipeline, _, _ = ddpm_folders
    assert detect_layout(google) == detect_layout(pipeline) == "unet2d"
    a, b = str(tmp_path / "a"), str(google_workdir[0])
    assert main(["convert", "--from", pipeline, "--to", a, "--data", "tfds:cifar10"]) == 0
    out = capsys.readouterr().out
    assert "UNet2DModel" in out and a in out and "checkpoints/0" in out
    exp_a, _, params_a, _ = load_trained(a)
    exp_b, _, params_b, _ = load_trained(b)
    assert exp_a.data.name == "tfds:cifar10" and exp_a.model == exp_b.model and exp_a.schedule == exp_b.schedule
    assert_trees_equal(params_a, params_b)

    # a non-empty target is refused (the library: FileExistsError; the command: exit 2 naming it)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert_unet2d(google, a)
    assert main(["convert", "--from", google, "--to", a]) == 2
    assert a in capsys.readouterr().err


def test_bad_sources_are_named(ddpm_folders, tmp_path, capsys):
    import shutil

    google = ddpm_folders[0]
    assert main(["convert", "--from", str(tmp_path), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a layout convert takes" in err and "UNet2DModel" in err and "Stable Diffusion" in err
    assert main(["convert", "--from", str(tmp_path / "nope"), "--to", str(tmp_path / "out")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["convert", "--from", google, "--to", str(tmp_path / "out"), "--data-dir", "x"]) == 2
    assert "--data-dir needs --data" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(google, broken)
    (broken / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        convert_unet2d(str(broken), str(tmp_path / "w1"))
    shutil.copy(f"{google}/scheduler_config.json", broken / "scheduler_config.json")
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        convert_unet2d(str(broken), str(tmp_path / "w2"))
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()   # nothing written on failure

    learned = tmp_path / "learned"
    shutil.copytree(google, learned)
    cfg = json.loads((learned / "scheduler_config.json").read_text())
    (learned / "scheduler_config.json").write_text(json.dumps({**cfg, "variance_type": "learned_range"}))
    with pytest.raises(ValueError, match="variance_type='learned_range'"):
        convert_unet2d(str(learned), str(tmp_path / "w3"))


def test_ncsnpp_score_sde_ve_pipeline_converts(tmp_path, caplog):
    """A ScoreSdeVePipeline (google/ncsnpp-* layout: Skip*Block2D, Fourier time embedding, ScoreSdeVeScheduler)
    becomes a VE-SDE workdir holding the converted score network, fed sigma as its time; a UNet2DModel
    whose time embedding does not fit its scheduler, and a scheduler without a beta table, are refused by name."""
    import shutil

    from flax import nnx

    from diffusion_jax.models import convert_diffusers_unet, unet_config_from_diffusers

    unet = random_torch_model(
        diffusers.UNet2DModel, seed=1, perturb=0.1, sample_size=8, block_out_channels=(128, 256), layers_per_block=1,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"), up_block_types=("AttnSkipUpBlock2D",
        "SkipUpBlock2D"), time_embedding_type="fourier", mid_block_scale_factor=2 ** 0.5, norm_eps=1e-6,
        attention_head_dim=None)
    scheduler = diffusers.ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0, snr=0.17)
    folder = tmp_path / "ncsnpp"
    diffusers.ScoreSdeVePipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    exp = convert_unet2d(str(folder), str(tmp_path / "workdir"))
    assert (exp.schedule.kind, exp.schedule.sigma_min, exp.schedule.sigma_max) == ("ve", 0.01, 50.0)
    assert (exp.loss.prediction, exp.sample.sampler, exp.model.skip_pyramid) == ("score", "pc", True)
    assert "snr=0.17" in caplog.text                            # what is not imported is said
    _, _, params, _ = load_trained(str(tmp_path / "workdir"))   # the converted network (its parity: test_unet.py)
    sd = unet.state_dict()
    converted = convert_diffusers_unet(sd, unet_config_from_diffusers(unet.config, sd))
    assert_trees_equal(params, nnx.to_pure_dict(converted))
    sigma = 20.0                                                # network time sigma(t) = sigma: VE's own
    assert float(build_schedule(exp.schedule).network_time(np.log(sigma / 0.01) / np.log(50.0 / 0.01))) == \
        pytest.approx(sigma, rel=1e-5)

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "linear"}))
    with pytest.raises(ValueError, match="time_embedding_type='fourier' does not go with .*DDPMScheduler"):
        convert_unet2d(str(broken), str(tmp_path / "w1"))
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EDMEulerScheduler"}))
    with pytest.raises(ValueError, match="_class_name='EDMEulerScheduler' has no DDPM beta table"):
        convert_unet2d(str(broken), str(tmp_path / "w2"))
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
