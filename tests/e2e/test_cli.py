"""The diffusion-jax command: errors that name the problem, and sampling from a trained workdir."""
import numpy as np
import pytest
from conftest import DIGITS
from PIL import Image

from diffusion_jax.cli.main import main


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


@pytest.mark.slow    # about 39 s on 2 cores (fresh clone): every cell of a compare grid, then a resumed run
def test_compare_runs_every_cell_and_resumes(capsys, trained_workdir, tmp_path, metrics_cache):
    out_dir = tmp_path / "cmp"
    argv = ["compare", "--workdir", trained_workdir, "--samplers", "ddim,heun,ddim:eta=1,pndm", "--nfe", "3,5",
            "--num", "12", "--seeds", "2", "--out", str(out_dir), "--no-progress", "--resamples", "20"]
    code, out = run(capsys, *argv)
    assert code == 0, out.err
    import csv

    rows = list(csv.DictReader(open(out_dir / "results.csv")))
    assert len(rows) == 3 * 2 * 2                        # pndm needs >= 13 NFE: skipped, and said so
    assert "pndm at NFE 3: skipped" in (out_dir / "results.md").read_text()
    heun = {int(r["target_nfe"]): (int(r["steps"]), int(r["nfe"])) for r in rows if r["sampler"] == "heun"}
    assert heun == {3: (2, 3), 5: (3, 5)}                 # Heun: 2K - 1 evaluations within the budget
    assert all(np.isfinite(float(r["fd"])) and 0 <= float(r["class_acc"]) <= 1 for r in rows)
    for name in ("quality_vs_nfe.png", "overview.png", "grids/ddim-nfe5.png", "grids/ddim_eta=1-nfe3.png"):
        assert (out_dir / name).exists(), name
    assert "plot:" in out.out and "results.md" in out.out
    # A second run resumes from the saved cells instead of sampling again.
    cells = sorted((out_dir / "cells").iterdir())
    stamps = [c.stat().st_mtime_ns for c in cells]
    code, _ = run(capsys, *argv)
    assert code == 0 and [c.stat().st_mtime_ns for c in cells] == stamps
    assert list(csv.DictReader(open(out_dir / "results.csv"))) == rows
    # ... but not when what defines a cell changed (here the clip): that cell is sampled again, the others are kept.
    code, _ = run(capsys, "compare", "--workdir", trained_workdir, "--samplers", "ddim", "--nfe", "3", "--num", "12",
                  "--seeds", "2", "--out", str(out_dir), "--clip", "0.5", "--no-progress", "--resamples", "20")
    resampled = sorted(c.name for c, s in zip(cells, stamps) if c.stat().st_mtime_ns != s)
    assert code == 0 and len(resampled) == 4 and all(n.startswith("ddim-nfe3-seed") for n in resampled), resampled


def test_compare_refuses_bad_flags(capsys, trained_workdir, tmp_path):
    code, out = run(capsys, "compare", "--workdir", trained_workdir, "--samplers", "ddim:s_churn=1", "--out",
                    str(tmp_path))
    assert code == 2 and "no option 's_churn'" in out.err
    code, out = run(capsys, "compare", "--workdir", trained_workdir, "--nfe", "5,x", "--out", str(tmp_path))
    assert code == 2 and "--nfe" in out.err
    code, out = run(capsys, "compare", "--workdir", trained_workdir, "--resamples", "5", "--out", str(tmp_path))
    assert code == 2 and "--resamples must be >= 20" in out.err


def test_generate_uses_common_random_numbers(trained_workdir):
    from diffusion_jax.eval.evaluate import generate
    from diffusion_jax.inference.sampling import SamplerSpec
    from diffusion_jax.train.checkpoint import load_trained

    exp, graphdef, params, _ = load_trained(trained_workdir)
    spec = SamplerSpec("ddim", steps=2)
    a, labels, nfe = generate(exp, graphdef, params, spec, num=5, seed=0, batch_size=3)
    b, _, _ = generate(exp, graphdef, params, spec, num=5, seed=0, batch_size=3)
    c, _, _ = generate(exp, graphdef, params, spec, num=5, seed=1, batch_size=3)
    assert a.shape == (5, 8, 8, 1) and nfe == 2 and labels.shape == (5,) and labels.max() < 10
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="labels must be"):
        generate(exp, graphdef, params, spec, num=2, labels=[0, 10])


def test_sample_defaults_come_from_the_run_config(capsys, trained_workdir, tmp_path):
    # The tiny run's config.sample: ddim, 50 steps, eta 0; --num given, everything else from the config.
    code, out = run(capsys, "sample", "--workdir", trained_workdir, "--num", "2", "--out", str(tmp_path / "c.png"))
    assert code == 0 and "(ddim, 50 steps, NFE 50" in out.out and "'eta': 0.0" in out.out
    code, out = run(capsys, "sample", "--workdir", trained_workdir, "--sampler", "heun", "--steps", "3",
                    "--spacing", "karras", "--num", "2", "--out", str(tmp_path / "h.png"))
    assert code == 0 and "(heun, 3 steps, NFE 5" in out.out  # Heun: 2K - 1 network calls


def _run_scheduler_config(workdir, tmp_path, name: str, **keys) -> str:
    """A diffusers scheduler config of class `name` on the run's own betas (export's DDPMScheduler keys + `keys`)."""
    import json

    from diffusion_jax.config import Experiment, load_workdir_config
    from diffusion_jax.train.export import scheduler_config

    cfg = {**scheduler_config(Experiment.from_config(load_workdir_config(workdir))), "_class_name": name, **keys}
    assert cfg["num_train_timesteps"] == 1000
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_sample_with_a_diffusers_scheduler_config(capsys, trained_workdir, tmp_path):
    """--scheduler-config DDIMScheduler (leading, no clipping) gives our ddim's samples; EulerDiscreteScheduler runs as
    euler and LCMScheduler as consistency; flags it decides, another noise schedule and refused classes are named
    errors (exit 2)."""
    ddim = _run_scheduler_config(trained_workdir, tmp_path, "DDIMScheduler", timestep_spacing="leading",
                                 clip_sample=False, steps_offset=0, set_alpha_to_one=True)
    common = ["sample", "--workdir", trained_workdir, "--steps", "3", "--num", "4", "--seed", "2"]
    code, out = run(capsys, *common, "--scheduler-config", ddim, "--out", str(tmp_path / "a.png"),
                    "--npz", str(tmp_path / "a.npz"))
    assert code == 0 and "DDIMScheduler as ddim" in out.out and "NFE 3" in out.out, out.err
    code, out = run(capsys, *common, "--sampler", "ddim", "--spacing", "leading", "--clip", "0", "--out",
                    str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz"))
    assert code == 0, out.err
    np.testing.assert_allclose(np.load(tmp_path / "a.npz")["x"], np.load(tmp_path / "b.npz")["x"], rtol=1e-5,
                               atol=1e-5)
    euler = _run_scheduler_config(trained_workdir, tmp_path, "EulerDiscreteScheduler", use_karras_sigmas=True)
    code, out = run(capsys, *common, "--scheduler-config", euler, "--out", str(tmp_path / "c.png"))
    assert code == 0 and "EulerDiscreteScheduler as euler" in out.out, out.err
    lcm = _run_scheduler_config(trained_workdir, tmp_path, "LCMScheduler")      # any x0 predictor runs (a restart)
    code, out = run(capsys, *common, "--scheduler-config", lcm, "--out", str(tmp_path / "e.png"))
    assert code == 0 and "LCMScheduler as consistency" in out.out, out.err
    for extra, match in ((["--scheduler-config", ddim, "--sampler", "heun"], "--sampler: the --scheduler-config"),
                         (["--scheduler-config", _run_scheduler_config(
                             trained_workdir, tmp_path, "DDIMScheduler", trained_betas=[0.01] * 1000,
                             timestep_spacing="leading")],
                          "another noise schedule"),
                         (["--scheduler-config", _run_scheduler_config(trained_workdir, tmp_path, "TCDScheduler")],
                          "TCDScheduler")):
        code, out = run(capsys, *common, *extra, "--out", str(tmp_path / "d.png"))
        assert code == 2 and match in out.err, out.err
        assert not (tmp_path / "d.png").exists()


def test_compare_takes_scheduler_configs(capsys, trained_workdir, tmp_path, metrics_cache):
    euler = _run_scheduler_config(trained_workdir, tmp_path, "HeunDiscreteScheduler")
    out_dir = tmp_path / "cmp"
    code, out = run(capsys, "compare", "--workdir", trained_workdir, "--samplers", "heun", "--scheduler-config",
                    euler, "--nfe", "5", "--num", "8", "--seeds", "1", "--out", str(out_dir), "--no-progress",
                    "--resamples", "20")
    assert code == 0, out.err
    import csv

    rows = {r["sampler"]: r for r in csv.DictReader(open(out_dir / "results.csv"))}
    assert set(rows) == {"heun", f"diffusers={euler}"}
    assert rows[f"diffusers={euler}"]["nfe"] == "5" and rows[f"diffusers={euler}"]["steps"] == "3"
