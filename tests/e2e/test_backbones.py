"""Every registered backbone trains through the one train loop (`--config.model.name=NAME`): each denoiser two steps,
then samples with classifier-free guidance (the autoencoder, model.name="vae", is trained through the same CLI
command by tests/e2e/test_latent_diffusion.py, whose latent run then uses it; the ControlNet, which adapts a trained
base run, by tests/e2e/test_controlnet_cli.py, LoRA by tests/e2e/test_lora_cli.py and DreamBooth by
tests/e2e/test_dreambooth_cli.py). Unknown names and keys are refused with the closest valid one."""
import json
import os

import numpy as np
import pytest
from conftest import DIGITS, TINY

from diffusion_jax.cli.main import main
from diffusion_jax.models.registry import BACKBONES, KINDS, names_of_kind


STANDALONE = [n for n in names_of_kind("denoiser") if BACKBONES[n].pretrained is None]
# the tiny model of each: the U-Nets share the TINY keys; DiT has its own (2 x 2 patches of the 8 x 8 digits), and
# trains on the rectified flow (SD3's pairing: schedule.kind=flow, the velocity, logit-normal times, shift 2)
OWN_KEYS = {"dit": ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2",
                    "schedule.kind=flow", "schedule.shift=2.0", "loss.prediction=flow",
                    "loss.time_sampling=logit_normal", "sample.spacing=uniform"],
            "uvit": ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2"]}


def test_every_backbone_has_a_test_of_its_kind():
    # denoisers: the parametrized test below; the one autoencoder: test_latent_diffusion.py's CLI run; the adapters of
    # a trained run (a `pretrained` hook): test_controlnet_cli.py, test_lora_cli.py, test_dreambooth_cli.py
    assert set(names_of_kind("denoiser")) | set(names_of_kind("autoencoder")) == set(BACKBONES)
    assert KINDS == ("denoiser", "autoencoder") and names_of_kind("autoencoder") == ["vae"]
    assert sorted(set(names_of_kind("denoiser")) - set(STANDALONE)) == ["controlnet", "dreambooth", "lora"]


@pytest.mark.parametrize("name", STANDALONE)
def test_every_denoiser_trains_two_steps_and_samples_with_cfg(name, tmp_path, capsys):
    from flax import nnx

    from diffusion_jax.train.checkpoint import load_trained

    workdir = str(tmp_path / name)
    overrides = [f"--config.{o}" for o in TINY if not o.startswith(("train.steps", "train.ckpt_every"))
                 and (name not in OWN_KEYS or not o.startswith("model."))]
    overrides += [f"--config.{o}" for o in OWN_KEYS.get(name, ["model.attention_resolutions=()"])]   # U-Nets:
    # attention in the middle block only, which compiles faster
    code = main(["train", "--config", DIGITS + ":debug", "--workdir", workdir, "--config.model.name=" + name,
                 "--config.train.steps=2", "--config.train.ckpt_every=2", "--no-progress", *overrides,
                 "--config.optim.warmup_steps=0", "--config.optim.learning_rate=0.01"])   # 2 steps that move it
    assert code == 0, capsys.readouterr().err
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["name"] == name and saved["model"]["num_classes"] == 10
    exp, graphdef, params, step = load_trained(workdir)
    assert step == 2 and type(nnx.merge(graphdef, params)) is BACKBONES[name].build
    assert exp.schedule.kind == ("flow" if name == "dit" else "discrete")

    out = str(tmp_path / "cfg.npz")
    code = main(["sample", "--workdir", workdir, "--sampler", "ddim", "--steps", "2", "--num", "2",
                 "--guidance-scale", "3", "--out", str(tmp_path / "cfg.png"), "--npz", out])
    assert code == 0, capsys.readouterr().err
    x = np.load(out)["x"]
    assert x.shape == (2, 8, 8, 1) and np.isfinite(x).all()
    # Guidance mixes two different branches: the trained network answers labels and the null class differently.
    net = nnx.merge(graphdef, params)
    xt = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
    t = np.array([500, 500], np.int32)
    cond, null = net(xt, t, y=np.array([3, 7], np.int32)), net(xt, t, y=np.array([10, 10], np.int32))
    assert float(np.abs(np.asarray(cond) - np.asarray(null)).max()) > 1e-4


def test_unknown_backbone_and_keys_are_named(tmp_path, capsys):
    code = main(["train", "--config", DIGITS + ":debug", "--workdir", str(tmp_path / "w"),
                 "--config.model.name=unet_cnd"])
    err = capsys.readouterr().err
    assert code == 2 and "model.name='unet_cnd' is not a registered backbone" in err and "did you mean 'unet_cond'" in err
    code = main(["train", "--config", DIGITS + ":debug", "--workdir", str(tmp_path / "w"),
                 "--config.model.name=unet_cond", "--config.model.transformer_layer=2"])
    err = capsys.readouterr().err
    assert code == 2 and "model.transformer_layer" in err and "did you mean 'transformer_layers'" in err
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
