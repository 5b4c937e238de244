"""Export to diffusers (`models/export_diffusers.py`, `train/export.py`, `diffusion-jax export`): what the project
writes, diffusers' `from_pretrained` loads, and the loaded PyTorch model gives our outputs; our own importers read
the folders back to the same params. Refusals name the reason and leave the target untouched."""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DIGITS, numpy_fill
from flax import nnx
from harness import assert_rel_close, need, nhwc, run_nhwc, to_torch

from diffusion_jax.cli.main import main
from diffusion_jax.config import load_experiment
from diffusion_jax.models.export_diffusers import (
    save_model_folder,
    unet2d_config,
    unet2d_state_dict,
    vae_diffusers_config,
    vae_state_dict,
)
from diffusion_jax.models.unet import UNet, UNetConfig
from diffusion_jax.models.vae import VAE, VAEConfig
from diffusion_jax.train.export import export_workdir, scheduler_config

# class-conditional, learned variance, two levels with attention on the second, two heads
COND = UNetConfig(image_size=8, in_channels=1, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, num_groups=4, num_classes=3, dropout=0.0, learn_sigma=True)


def _random(module_cls, config, seed=0):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0))), nnx.Param)
    params = numpy_fill(nnx.to_pure_dict(abstract), seed)
    net = nnx.merge(graphdef, abstract)
    nnx.update(net, params)
    return net, params


def test_unet2d_export_loads_in_diffusers_and_gives_our_outputs(tmp_path):
    diffusers = need("diffusers")
    net, params = _random(UNet, COND)
    save_model_folder(str(tmp_path), unet2d_config(COND), unet2d_state_dict(params, COND))
    model = diffusers.UNet2DModel.from_pretrained(str(tmp_path)).eval()
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 1)).astype(np.float32)
    t, y = np.array([0, 10, 500, 999]), np.array([0, 1, 2, 3])   # y = 3: the null class of CFG
    ours = np.asarray(net(jnp.asarray(x), jnp.asarray(t), y=jnp.asarray(y)))
    ref = run_nhwc(model, x, t, class_labels=y)
    assert ours.shape == ref.shape == (4, 8, 8, 2)
    assert_rel_close(ours, ref, 1e-4, "exported UNet2DModel")


def test_unconditional_export_round_trips_through_the_importer(tmp_path):
    from diffusion_jax.train.ddpm_import import convert_unet2d

    need("safetensors")
    cfg = UNetConfig(image_size=8, in_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), num_groups=4, dropout=0.0)
    _, params = _random(UNet, cfg, seed=1)
    exp = load_experiment(DIGITS, ["loss.prediction=v", "schedule.name=linear",
                                   "sample.spacing=trailing"])[0]
    save_model_folder(str(tmp_path / "src" / "unet"), unet2d_config(cfg), unet2d_state_dict(params, cfg))
    os.makedirs(tmp_path / "src" / "scheduler")
    (tmp_path / "src" / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(exp)))
    back = convert_unet2d(str(tmp_path / "src"), str(tmp_path / "workdir"))
    assert back.model == dataclasses.replace(cfg, out_channels=1) and back.loss.prediction == "v" and back.sample.spacing == "trailing"
    assert back.schedule.name == "linear" and back.schedule.num_timesteps == exp.schedule.num_timesteps
    from diffusion_jax.train.checkpoint import load_trained

    _, _, loaded, _ = load_trained(str(tmp_path / "workdir"))
    flat = lambda tree: {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.State(tree))}   # noqa: E731
    a, b = flat(params), flat(loaded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_vae_export_loads_in_diffusers_and_gives_our_outputs(tmp_path):
    diffusers, torch = need("diffusers", "torch")
    cfg = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                    norm_num_groups=4, scaling_factor=0.7)
    vae, params = _random(VAE, cfg, seed=2)
    save_model_folder(str(tmp_path), vae_diffusers_config(cfg, sample_size=16), vae_state_dict(params, cfg))
    assert VAEConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text())) == cfg
    model = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
    x = np.random.default_rng(3).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
    post = vae.encode(jnp.asarray(x))
    with torch.no_grad():
        mean = nhwc(model.encode(to_torch(x, nchw_from_nhwc=True)).latent_dist.mean)
        recon = nhwc(model.decode(to_torch(np.asarray(post.mean), nchw_from_nhwc=True)).sample)
    assert_rel_close(np.asarray(post.mean), mean, 1e-4, "exported AutoencoderKL encoder")
    assert_rel_close(np.asarray(vae.decode(post.mean)), recon, 1e-4, "exported AutoencoderKL decoder")


def test_export_cli_writes_a_ddpm_pipeline_that_diffusers_loads(trained_workdir, tmp_path, capsys):
    diffusers = need("diffusers")
    from diffusion_jax.process.discrete import make_schedule
    from diffusion_jax.train.checkpoint import load_trained

    out = tmp_path / "exported"
    code = main(["export", "--workdir", trained_workdir, "--to", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "DDPMPipeline.from_pretrained" in capsys.readouterr().out
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    exp, graphdef, params, _ = load_trained(trained_workdir)
    ours_abar = np.asarray(make_schedule(exp.schedule.name, exp.schedule.num_timesteps).alphas_cumprod)
    np.testing.assert_allclose(pipe.scheduler.alphas_cumprod.numpy(), ours_abar, rtol=1e-5, atol=1e-7)
    assert pipe.scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[exp.loss.prediction]
    net = nnx.merge(graphdef, params)
    x = np.random.default_rng(4).standard_normal((2, 8, 8, 1)).astype(np.float32)
    t, y = np.array([3, 700]), np.array([5, exp.model.num_classes])
    ours = np.asarray(net(jnp.asarray(x), jnp.asarray(t), y=jnp.asarray(y)))
    ref = run_nhwc(pipe.unet, x, t, class_labels=y)
    assert_rel_close(ours, ref, 1e-4, "exported EMA U-Net")
    # a target that exists and is not empty is refused, and left as it was
    code = main(["export", "--workdir", trained_workdir, "--to", str(out)])
    assert code == 2 and "exists and is not an empty folder" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "unet"]


def test_export_refusals_name_the_reason(tmp_path):
    exp = load_experiment(DIGITS, ["schedule.kind=vp", "sample.spacing=logsnr", "sample.sampler=dpmpp_2m"])[0]
    with pytest.raises(ValueError, match="schedule.kind='vp': diffusers' DDPMScheduler is discrete-time"):
        scheduler_config(exp)
    with pytest.raises(ValueError, match="model.time_embedding='fourier' has no diffusers UNet2DModel"):
        unet2d_config(UNetConfig(time_embedding="fourier"))
    with pytest.raises(ValueError, match="model.num_heads=4 gives different head widths"):
        unet2d_config(UNetConfig(channels=32, channel_mult=(1, 3), num_heads=4, attention_resolutions=(32,)))
    workdir = tmp_path / "cond"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model": {"name": "controlnet", "base": {"name": "unet"}},
                                                     "data": {"image_size": 32}}))
    with pytest.raises(ValueError, match="only a ControlNet on a 'unet_cond' base can be exported"):
        export_workdir(str(workdir), str(tmp_path / "out"))
    (workdir / "config.json").write_text(json.dumps({"model": {"name": "classifier"}}))
    with pytest.raises(ValueError, match="model.name='classifier' cannot be exported to diffusers"):
        export_workdir(str(workdir), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unet_cond_export_loads_in_diffusers_and_gives_our_outputs(tmp_path):
    from diffusion_jax.models.export_diffusers import unet_cond_diffusers_config, unet_cond_state_dict
    from diffusion_jax.models.unet_cond_backbone import UNetCondBackbone, UNetCondBackboneConfig

    diffusers = need("diffusers")
    cfg = UNetCondBackboneConfig(image_size=8, in_channels=4, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                 attention_resolutions=(8,), num_heads=2, num_groups=4, num_classes=3, context_dim=12)
    net, params = _random(UNetCondBackbone, cfg, seed=4)
    save_model_folder(str(tmp_path / "unet"), unet_cond_diffusers_config(cfg.diffusers_config()),
                      unet_cond_state_dict(params["net"]))
    model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t, y = np.array([5, 900]), np.array([1, 3])
    context = rng.standard_normal((2, 5, 12)).astype(np.float32)
    ours = np.asarray(net(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), jnp.asarray(context)))
    ref = run_nhwc(model, x, t, encoder_hidden_states=context, class_labels=y)
    assert_rel_close(ours, ref, 1e-4, "exported UNet2DConditionModel")
