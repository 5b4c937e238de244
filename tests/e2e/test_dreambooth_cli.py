"""DreamBooth through the CLI: `train` with configs/dreambooth_digits.py (the shipped bold-3 subject, a grey image
folder) on a trained class-conditional base draws the class images once into the workdir and fine-tunes the whole
network with one more label (a resumed run reads the cached class images: tests/unit/test_dreambooth_recipe.py);
`sample --label 10` draws the subject, `export` writes a UNet2DModel with the extra label; and the user errors exit
2 naming the key."""
import json
import os

import jax
import numpy as np
import pytest
from conftest import ROOT

from diffusion_jax.cli.main import main

CONFIG = os.path.join(ROOT, "configs", "dreambooth_digits.py") + ":debug"
FAST = ["--config.train.steps=2", "--config.train.batch_size=8", "--config.train.sample_num=4",
        "--config.train.sample_steps=2", "--config.train.async_checkpointing=False", "--config.train.ckpt_every=2",
        "--config.optim.warmup_steps=0", "--config.model.num_class_images=10", "--config.sample.steps=2",
        "--no-progress"]


@pytest.fixture(scope="module")
def dreambooth_workdir(trained_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dreambooth") / "run")
    assert main(["train", "--config", CONFIG, "--workdir", workdir, f"--config.model.base_workdir={trained_workdir}",
                 *FAST]) == 0
    return workdir


def test_dreambooth_trains_samples_the_identifier_and_exports(dreambooth_workdir, trained_workdir, tmp_path, capsys):
    from diffusion_jax.train.checkpoint import load_trained

    _, _, base, _ = load_trained(trained_workdir)
    exp, _, params, step = load_trained(dreambooth_workdir)
    assert step == 2 and exp.model.num_classes == 11 and exp.model.identifier == 10
    assert params["class_embed"]["embedding"].shape[0] == 12
    tuned = {k: v for k, v in params.items() if k != "class_embed"}
    frozen = {k: v for k, v in base.items() if k != "class_embed"}
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(frozen)))  # all train
    with np.load(os.path.join(dreambooth_workdir, "class_images.npz")) as f:
        assert f["images"].shape == (10, 8, 8, 1) and int(f["class_label"]) == 3
    assert os.path.isfile(os.path.join(dreambooth_workdir, "class_images.png"))
    capsys.readouterr()
    assert main(["sample", "--workdir", dreambooth_workdir, "--label", "10", "--sampler", "ddim", "--steps", "2",
                 "--num", "4", "--out", str(tmp_path / "v.png"), "--npz", str(tmp_path / "v.npz")]) == 0
    with np.load(tmp_path / "v.npz") as f:
        assert f["x"].shape == (4, 8, 8, 1) and np.all(f["labels"] == 10)
    out = tmp_path / "exported"
    assert main(["export", "--workdir", dreambooth_workdir, "--to", str(out)]) == 0
    with open(out / "unet" / "config.json") as f:
        assert json.load(f)["num_class_embeds"] == 12


def test_dreambooth_errors_exit_2_with_the_problem_named(trained_workdir, tmp_path, capsys):
    run = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "w"), f"--config.model.base_workdir={trained_workdir}"]
    cases = [
        ([*run, "--config.model.class_label=10"], "model.class_label=10 must be one of the base's labels 0..9"),
        ([*run, "--config.data.grayscale=False"], "the subject's images (data 'folder') are (8, 8, 3)"),
        ([*run, "--config.data.data_dir=" + str(tmp_path / "none")], "does not exist"),
        ([*run, "--config.model.prior_loss_weight=-1.0"], "model.prior_loss_weight=-1.0"),
        ([*run, "--config.loss.prediction=eps"], "loss.prediction='eps' but the base run"),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err, (argv, err)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
    assert not os.path.exists(tmp_path / "w" / "class_images.npz")
