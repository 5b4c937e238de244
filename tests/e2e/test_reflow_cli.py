"""Reflow through the CLI (train/reflow.py): a tiny rectified flow trains, `diffusion-jax reflow` writes the pairs of
its ODE, and a 2-rectified flow trains on them from its weights (train.init_from); straightness is measured on both.
Refusals: a stochastic sampler, pairs for a non-flow objective, an init_from of another model."""
import json

import numpy as np
import pytest
from conftest import DIGITS, TINY

from diffusion_jax.cli.main import main

FLOW = ["schedule.kind=flow", "loss.prediction=flow", "sample.spacing=uniform"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("flow") / "rf1")
    overrides = [f"--config.{o}" for o in TINY + FLOW if not o.startswith("train.steps")]
    assert main(["train", "--config", DIGITS + ":debug", "--workdir", workdir, "--no-progress",
                 "--config.train.steps=2", *overrides]) == 0
    return workdir, overrides


def test_pairs_of_a_trained_flow_train_a_2_rectified_flow_from_its_weights(flow_run, tmp_path, capsys):
    from diffusion_jax.data.pairs import load_pairs
    from diffusion_jax.eval.straightness import model_straightness
    from diffusion_jax.train.checkpoint import load_trained

    workdir, overrides = flow_run
    pairs = str(tmp_path / "pairs.npz")
    assert main(["reflow", "--workdir", workdir, "--out", pairs, "--num", "12", "--sampler", "flow_euler",
                 "--steps", "2", "--batch-size", "8", "--no-progress"]) == 0
    assert "12 noise-sample pairs of step 2 (flow_euler, 2 steps, NFE 2)" in capsys.readouterr().out
    source = load_pairs(pairs, image_size=8)
    assert source.num_examples == 12 and source.num_classes == 10
    assert source.meta["workdir"].endswith("rf1") and source.meta["nfe"] == 2 and source.meta["kind"] == "flow"
    np.testing.assert_array_equal(source.get(np.arange(12))["label"], np.arange(12) % 10)

    # the pairs are the run's ODE map: the same x_T through `sample`'s flow_euler gives the same images
    exp, graphdef, params, _ = load_trained(workdir)
    from diffusion_jax.config import build_schedule
    from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn

    got = source.get(np.arange(8))
    fn = make_sample_fn(graphdef, build_schedule(exp.schedule), SamplerSpec("flow_euler", steps=2, spacing="trailing",
                        clip_denoised=None), (8, 8, 8, 1), prediction="flow", num_classes=10)
    x, _ = fn(params, None, got["label"], None, got["noise"])
    np.testing.assert_allclose(np.asarray(x), got["image"], atol=1e-5)

    # one step at the warm-up's zero learning rate keeps the 1-rectified flow's weights: init_from loaded them
    rf2 = str(tmp_path / "rf2")
    assert main(["train", "--config", DIGITS + ":debug", "--workdir", rf2, "--no-progress", *overrides,
                 "--config.train.steps=1", "--config.data.name=pairs", f"--config.data.data_dir={pairs}",
                 f"--config.train.init_from={workdir}", "--config.optim.warmup_steps=5"]) == 0
    saved = json.load(open(f"{rf2}/config.json"))
    assert saved["data"]["name"] == "pairs" and saved["train"]["init_from"] == workdir
    exp2, _, params2, step2 = load_trained(rf2)
    assert step2 == 1
    from diffusion_jax.eval.evaluate import evaluation_data

    assert evaluation_data(exp2.data) == exp.data   # scored (compare, likelihood) against the source run's data
    import jax

    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)   # the EMA of equal params

    s = model_straightness(exp, graphdef, params, got["noise"], got["label"], steps=8, batch_size=8)
    assert s.shape == (8,) and np.isfinite(s).all() and (s >= 0).all()


def test_reflow_refuses_what_cannot_be_a_coupling(flow_run, tmp_path, capsys):
    workdir, overrides = flow_run
    out = str(tmp_path / "p.npz")
    assert main(["reflow", "--workdir", workdir, "--out", out, "--num", "4", "--sampler", "ddpm",
                 "--no-progress"]) == 2
    assert "sampler 'ddpm' is stochastic" in capsys.readouterr().err
    assert main(["reflow", "--workdir", str(tmp_path / "none"), "--out", out, "--num", "4", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a 4-channel-wide model cannot start from the 8-channel run
    code = main(["train", "--config", DIGITS + ":debug", "--workdir", str(tmp_path / "w"), "--no-progress",
                 *overrides, "--config.model.channels=4", "--config.model.num_groups=2",
                 f"--config.train.init_from={workdir}"])
    assert code == 2
    assert f"train.init_from={workdir!r} does not fit this model" in capsys.readouterr().err
