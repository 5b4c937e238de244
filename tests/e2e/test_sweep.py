"""diffusion-jax sweep: grid parsing, validation of every cell before training, resume without redoing work,
and cells that differ only in sample.* keys sharing one trained model."""
import math
import os

import pytest
from conftest import DIGITS, TINY

from diffusion_jax.cli.main import main
from diffusion_jax.config import SampleConfig
from diffusion_jax.eval import report
from diffusion_jax.eval.sweep import parse_grid, plan_cells, run_sweep
from diffusion_jax.inference.sampling import SamplerSpec

# The tiny U-Net at 16x16 (the digits classifier's size) with one resolution and no attention (compiles in about
# half the time of TINY's), 3 training steps, 3 sampling steps.
SWEEP_TINY = [*TINY, "data.image_size=16", "model.channel_mult=(1,)", "model.attention_resolutions=()",
              "sample.steps=3"]
FLAGS = [f"--config.{o}" for o in SWEEP_TINY]


@pytest.fixture(scope="module")
def cache_dir(metrics_cache):
    """The session's metrics cache: the digits classifier trains once (~20 s) for all the tests that score."""
    return metrics_cache


def test_parse_grid_good_and_bad():
    assert parse_grid("model.channels=8,16; optim.learning_rate=1e-3,2e-3") == [
        ("model.channels", ["8", "16"]), ("optim.learning_rate", ["1e-3", "2e-3"])]
    # Commas inside brackets stay in the value; '|' separates when given.
    assert parse_grid("model.channel_mult=(1,2),(1,2,4)") == [("model.channel_mult", ["(1,2)", "(1,2,4)"])]
    assert parse_grid("model.channel_mult=(1,2)|(1,2,4);sample.sampler=ddim") == [
        ("model.channel_mult", ["(1,2)", "(1,2,4)"]), ("sample.sampler", ["ddim"])]
    for bad, part in [("", "empty"), ("a.b=1;;c.d=2", "axis 2"), ("a.b=1;c.d", "'c.d'"), ("a.b=1,", "'a.b=1,'"),
                      ("a.b=(1,2", "unbalanced"), ("a.b=1;a.b=2", "'a.b'"), ("a.b=1,1", "repeats"),
                      ("=1", "'=1'")]:
        with pytest.raises(ValueError, match=part):
            parse_grid(bad)


def test_plan_cells_names_and_shared_train_dirs():
    cells = plan_cells(DIGITS + ":debug", "model.channel_mult=(1,2)|(1,2,4);sample.steps=2,3", SWEEP_TINY, "R")
    assert [c.name for c in cells] == ["model.channel_mult=1-2,sample.steps=2", "model.channel_mult=1-2,sample.steps=3",
                                       "model.channel_mult=1-2-4,sample.steps=2",
                                       "model.channel_mult=1-2-4,sample.steps=3"]
    assert [c.train_dir for c in cells] == [os.path.join("R", "model.channel_mult=1-2")] * 2 + [
        os.path.join("R", "model.channel_mult=1-2-4")] * 2
    assert cells[2].exp.model.channel_mult == (1, 2, 4) and cells[3].exp.sample.steps == 3
    assert cells[0].values == {"model.channel_mult": "(1, 2)", "sample.steps": "2"}
    with pytest.raises(ValueError, match="same config"):
        plan_cells(DIGITS + ":debug", "optim.learning_rate=1e-3,0.001", SWEEP_TINY)


def test_sampler_spec_from_config():
    spec = SamplerSpec.from_config(SampleConfig(sampler="ddim", steps=7, eta=0.5, clip_denoised=0.0))
    assert (spec.sampler, spec.steps, spec.clip_denoised, spec.options) == ("ddim", 7, 0.0, (("eta", 0.5),))
    spec = SamplerSpec.from_config(SampleConfig(sampler="ddpm", variance="fixed_large"),
                                   options={"variance": "learned"})
    assert spec.options == (("variance", "learned"),)
    assert SamplerSpec.from_config(SampleConfig(sampler="heun")).options == ()


@pytest.mark.parametrize("grid, named", [
    ("optim.learning_rate=1e-3,2e-3;model.chanels=8", "model.chanels"),        # typo: "did you mean"
    ("optim.learning_rate=1e-3,-1", "optim.learning_rate"),                     # bad value in the last cell
    ("sample.sampler=ddim,dpm_2m", "dpm_2m"),
    ("optim.learning_rate=1e-3;", "axis 2"),
])
def test_bad_cell_fails_before_anything_trains(capsys, tmp_path, grid, named):
    root = tmp_path / "sweep"
    code = main(["sweep", "--config", DIGITS + ":debug", "--grid", grid, "--root", str(root), *FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and named in err, err
    assert not root.exists()  # nothing trained, nothing written


def _mtimes(root, pattern_dirs):
    out = {}
    for d in pattern_dirs:
        for dirpath, dirnames, filenames in os.walk(root / d):
            for name in dirnames + filenames:
                if name.startswith("eval-") or os.path.basename(dirpath) == "checkpoints":
                    path = os.path.join(dirpath, name)
                    out[path] = os.stat(path).st_mtime_ns
    return out


@pytest.mark.slow    # about 30 s: two training runs and their evaluations through the sweep CLI
def test_two_cell_sweep_runs_and_resumes(capsys, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", cache_dir)
    root = tmp_path / "sweep"
    argv = ["sweep", "--config", DIGITS + ":debug", "--grid", "optim.learning_rate=1e-3,2e-3", "--root", str(root),
            "--num", "20", "--seed", "1", *FLAGS]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    cells = ["optim.learning_rate=0.001", "optim.learning_rate=0.002"]
    assert sorted(os.listdir(root)) == sorted(cells + ["summary.csv", "summary.md"])
    rows = report.read_csv(root / "summary.csv")
    assert [r["optim.learning_rate"] for r in rows] == ["0.001", "0.002"]
    for r in rows:
        assert math.isfinite(float(r["fd"])) and float(r["fd"]) >= 0
        assert math.isfinite(float(r["loss"])) and r["nfe"] == "3" and r["step"] == "3"
        assert float(r["train_s"]) > 0 and 0 <= float(r["class_acc"]) <= 1
    md = (root / "summary.md").read_text()
    assert md.count("| 0.00") == 2 and "| optim.learning_rate | fd | kid |" in md
    assert "| optim.learning_rate | fd |" in out and "summary.csv" in out
    for cell in cells:  # 3 steps, checkpoints at 2 and 3; one evaluation each
        assert sorted(os.listdir(root / cell / "checkpoints")) == ["2", "3"]
        assert len([f for f in os.listdir(root / cell) if f.startswith("eval-")]) == 1
    before = _mtimes(root, cells)

    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert _mtimes(root, cells) == before  # no new checkpoint, no new evaluation
    assert "skipped 2 of 2 cell(s)" in out and all(c in out for c in cells)
    assert out.count("not retrained") == 2
    assert report.read_csv(root / "summary.csv") == rows

    # A root whose cells hold another model is refused before anything runs.
    assert main([*argv, "--config.model.channels=4"]) == 2
    assert "holds a run with different model.channels" in capsys.readouterr().err
    assert _mtimes(root, cells) == before

    # Another sampling seed is another evaluation of the same trained cells.
    assert main([*argv[:-len(FLAGS) - 1], "2", "--no-progress", *FLAGS]) == 0
    assert "skipped" not in capsys.readouterr().out.replace("not retrained", "")
    assert all(len([f for f in os.listdir(root / c) if f.startswith("eval-")]) == 2 for c in cells)


def test_sample_only_grid_trains_once(tmp_path, cache_dir, capsys):
    root = tmp_path / "sweep"
    rows = run_sweep(DIGITS + ":debug", "sample.steps=2,3", str(root), overrides=SWEEP_TINY, num=20,
                     cache_dir=cache_dir, progress=False)
    assert sorted(os.listdir(root)) == ["base", "summary.csv", "summary.md"]  # one trained workdir
    assert sorted(os.listdir(root / "base" / "checkpoints")) == ["2", "3"]
    assert len([f for f in os.listdir(root / "base") if f.startswith("eval-")]) == 2
    assert [(r["sample.steps"], r["nfe"]) for r in rows] == [("2", 2), ("3", 3)]
    assert rows[0]["loss"] == rows[1]["loss"] and all(math.isfinite(r["fd"]) for r in rows)
    assert "| sample.steps |" in capsys.readouterr().out
