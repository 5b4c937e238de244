"""The diffusion-jax command: errors that name the problem, and sampling from a trained workdir."""
import numpy as np
import pytest
from PIL import Image

from diffusion_jax.cli import main

from conftest import DIGITS


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


def test_sample_from_missing_workdir(capsys, tmp_path):
    code, out = run(capsys, "sample", "--workdir", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in out.err and "nope" in out.err


def test_sample_from_workdir_without_checkpoint(capsys, tmp_path):
    code, out = run(capsys, "sample", "--workdir", str(tmp_path))
    assert code == 2 and "config.json" in out.err


def test_unknown_config_key(capsys, tmp_path):
    code, out = run(capsys, "train", "--config", DIGITS, "--workdir", str(tmp_path), "--config.train.stpes=5")
    assert code == 2 and "train.stpes" in out.err and "steps" in out.err
    assert not (tmp_path / "config.json").exists()  # failed before touching the workdir


def test_bad_image_size(capsys, tmp_path):
    code, out = run(capsys, "train", "--config", DIGITS, "--workdir", str(tmp_path), "--config.data.image_size=30")
    assert code == 2 and "model.image_size=30" in out.err and "divisible" in out.err


def test_missing_config_file(capsys, tmp_path):
    code, out = run(capsys, "train", "--config", "configs/nope.py", "--workdir", str(tmp_path))
    assert code == 2 and "configs/nope.py" in out.err


def test_unknown_flag_is_an_argparse_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--config", DIGITS, "--workdir", str(tmp_path), "--stpes", "3"])
    assert "--stpes" in capsys.readouterr().err


def test_sample_writes_grid_and_npz_deterministically(capsys, trained_workdir, tmp_path):
    outs = []
    for name in ("a", "b"):
        code, out = run(capsys, "sample", "--workdir", trained_workdir, "--steps", "3", "--num", "6", "--seed", "1",
                        "--out", str(tmp_path / f"{name}.png"), "--npz", str(tmp_path / f"{name}.npz"))
        assert code == 0, out.err
        assert "NFE 3" in out.out
        outs.append(np.load(tmp_path / f"{name}.npz"))
    assert outs[0]["images"].shape == (6, 8, 8, 1) and outs[0]["images"].dtype == np.uint8
    np.testing.assert_array_equal(outs[0]["images"], outs[1]["images"])
    np.testing.assert_array_equal(outs[0]["labels"], np.arange(6) % 10)
    assert Image.open(tmp_path / "a.png").size[0] > 8


def test_sample_with_ddpm_and_bad_steps(capsys, trained_workdir, tmp_path):
    code, out = run(capsys, "sample", "--workdir", trained_workdir, "--sampler", "ddpm", "--steps", "4", "--num", "2",
                    "--out", str(tmp_path / "d.png"))
    assert code == 0 and "NFE 4" in out.out
    code, out = run(capsys, "sample", "--workdir", trained_workdir, "--steps", "0", "--out", str(tmp_path / "e.png"))
    assert code == 2 and "--steps" in out.err


def test_sampler_grid_experiment(trained_workdir, tmp_path):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "sampler_grid.py")
    spec = importlib.util.spec_from_file_location("sampler_grid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--workdir", trained_workdir, "--steps", "2", "--num", "2", "--out", str(tmp_path)])
    index = (tmp_path / "index.md").read_text()
    assert index.count("| 2 | 2 |") == 3  # ddim, ddpm_small, ddpm_large at 2 steps, NFE 2
    assert (tmp_path / "ddim_0002.png").exists()


def test_sample_defaults_come_from_the_run_config(capsys, trained_workdir, tmp_path):
    # The tiny run's config.sample: ddim, 50 steps, eta 0; --num given, everything else from the config.
    code, out = run(capsys, "sample", "--workdir", trained_workdir, "--num", "2", "--out", str(tmp_path / "c.png"))
    assert code == 0 and "(ddim, 50 steps, NFE 50" in out.out and "'eta': 0.0" in out.out
    code, out = run(capsys, "sample", "--workdir", trained_workdir, "--sampler", "heun", "--steps", "3",
                    "--spacing", "karras", "--num", "2", "--out", str(tmp_path / "h.png"))
    assert code == 0 and "(heun, 3 steps, NFE 5" in out.out  # Heun: 2K - 1 network calls
