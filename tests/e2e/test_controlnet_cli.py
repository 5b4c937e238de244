"""ControlNet through the CLI: `train` with configs/controlnet_digits.py on a trained base workdir (the base stays
locked in the checkpoint), `sample --control / --control-from / --controlnet / --conditioning-scale / --guess-mode`,
and the user errors (a control image of the wrong size or channels, a missing base, a base trained with another
schedule, mismatched flags) as one line and exit 2."""
import json
import os

import jax
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from diffusion_jax.cli.main import main

CONFIG = os.path.join(ROOT, "configs", "controlnet_digits.py") + ":debug"
FAST = ["--config.train.steps=2", "--config.train.batch_size=8", "--config.train.sample_num=4",
        "--config.train.sample_steps=2", "--config.train.async_checkpointing=False", "--no-progress"]


def _png(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def controlnet_workdir(trained_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("controlnet") / "run")
    code = main(["train", "--config", CONFIG, "--workdir", workdir, f"--config.model.base_workdir={trained_workdir}",
                 *FAST])
    assert code == 0
    return workdir


def test_train_locks_the_base_and_saves_its_section(controlnet_workdir, trained_workdir):
    from diffusion_jax.train.checkpoint import load_trained

    saved = json.load(open(os.path.join(controlnet_workdir, "config.json")))
    base_saved = json.load(open(os.path.join(trained_workdir, "config.json")))
    assert saved["model"]["name"] == "controlnet" and saved["model"]["base"] == base_saved["model"]
    _, _, base, _ = load_trained(trained_workdir)
    exp, _, params, step = load_trained(controlnet_workdir)
    assert step == 2 and exp.model.condition == "canny"
    for a, b in zip(jax.tree.leaves(params["base"]), jax.tree.leaves(base)):
        assert np.array_equal(a, b)
    assert os.path.exists(os.path.join(controlnet_workdir, "samples", "step_00000002.png"))


def test_sample_with_control(controlnet_workdir, tmp_path, capsys):
    digit = np.zeros((8, 8), np.uint8)
    digit[1:7, 3:5] = 255                                   # a "1"
    image = _png(tmp_path / "one.png", digit)
    edges = _png(tmp_path / "edges.png", np.where(np.abs(np.diff(digit.astype(int), axis=1, prepend=0)) > 0, 255, 0))
    out = str(tmp_path / "s.npz")
    base = ["sample", "--workdir", controlnet_workdir, "--steps", "2", "--num", "2", "--label", "1"]
    assert main([*base, "--control-from", image, "--out", str(tmp_path / "a.png"), "--npz", out]) == 0
    assert "1 ControlNet(s) at conditioning_scale 1" in capsys.readouterr().out
    assert np.load(out)["labels"].tolist() == [1, 1] and np.isfinite(np.load(out)["x"]).all()
    assert main([*base, "--control", edges, "--guess-mode", "--guidance-scale", "2", "--conditioning-scale", "0.5",
                 "--out", str(tmp_path / "b.png")]) == 0
    assert "conditioning_scale 0.5 in guess mode" in capsys.readouterr().out
    # two ControlNets on one base (the same run twice), one scale each
    assert main([*base, "--controlnet", controlnet_workdir, "--control-from", image, "--control-from", image,
                 "--conditioning-scale", "1", "--conditioning-scale", "0", "--out", str(tmp_path / "c.png")]) == 0
    assert "2 ControlNet(s) at conditioning_scale 1, 0" in capsys.readouterr().out
    # editing under control (inpainting the centre of the digit; img2img goes through the same `edit`)
    assert main(["edit", "--workdir", controlnet_workdir, "--task", "inpaint", "--image", image, "--control-from",
                 image, "--steps", "2", "--num", "2", "--label", "1", "--out", str(tmp_path / "e.png")]) == 0
    assert "1 ControlNet(s) at conditioning_scale 1" in capsys.readouterr().out


def test_control_errors_exit_2_with_the_problem_named(controlnet_workdir, trained_workdir, tmp_path, capsys):
    base = ["sample", "--workdir", controlnet_workdir, "--steps", "2", "--num", "2", "--out", str(tmp_path / "x.png")]
    big = _png(tmp_path / "big.png", np.zeros((16, 16), np.uint8))
    colour = _png(tmp_path / "colour.png", np.random.default_rng(0).integers(0, 255, (8, 8, 3)))
    cases = [
        ([*base, "--control", big], "is 16x16 (HxW) but the model takes 8x8"),
        ([*base, "--control", colour], "is a colour image (mode RGB) but this ControlNet takes 1 channel"),
        ([*base, "--control", big, "--control-from", big], "either all as --control FILE or all as --control-from"),
        ([*base, "--control", colour, "--conditioning-scale", "1", "--conditioning-scale", "2"],
         "--conditioning-scale: give one value or one per ControlNet (1), got 2"),
        (["sample", "--workdir", trained_workdir, "--control", big, "--num", "2"], "not a ControlNet"),
        (["sample", "--workdir", trained_workdir, "--guess-mode", "--num", "2"], "need control images"),
        (["train", "--config", CONFIG, "--workdir", str(tmp_path / "w1"),
          f"--config.model.base_workdir={tmp_path / 'nothing'}"], "has no config.json"),
        (["train", "--config", CONFIG, "--workdir", str(tmp_path / "w2"), f"--config.model.base_workdir={trained_workdir}",
          "--config.schedule.name=linear", "--config.schedule.beta_start=0.0001", "--config.schedule.beta_end=0.02"],
         "schedule.beta_end=0.02 but the base run"),
    ]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err, (argv, err)
    assert not os.path.exists(tmp_path / "w2" / "checkpoints")
