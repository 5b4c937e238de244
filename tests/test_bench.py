"""`diffusion-jax bench train_step` on the digits model: both sides run, with the same parameter count."""
import csv
import os

import pytest


@pytest.mark.slow    # about a minute: three compiles of the digits train step
@pytest.mark.torch
def test_train_step_bench_times_both_sides_of_the_same_network(tmp_path):
    pytest.importorskip("diffusers")
    from diffusion_jax.bench import main

    rows = main(["--models", "digits", "--batch", "8", "--rounds", "2", "--steps", "1", "--out", str(tmp_path)])
    (row,) = rows
    assert row["params"] == row["torch_params"]   # diffusers' UNet2DModel is the same architecture
    assert row["step_s"] > 0 and row["torch_step_s"] > 0 and row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert row["gflop_per_s"] > 0 and row["xla_buffers_mb"] > 0 and row["compile_s"] > 0
    with open(os.path.join(tmp_path, "train_step.csv")) as f:
        assert next(csv.DictReader(f))["model"] == "digits"
    assert "ours / PyTorch" in open(os.path.join(tmp_path, "train_step.md")).read()


def test_unknown_model_is_named():
    from diffusion_jax.bench import main

    with pytest.raises(ValueError, match="unknown model 'imagenet'"):
        main(["--models", "imagenet"])


@pytest.mark.slow    # a few seconds: one compile of a 3-step DDIM loop
@pytest.mark.torch
def test_ddim_loop_bench_alternates_both_sides(tmp_path):
    pytest.importorskip("diffusers")
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("samplers_bench", os.path.join(root, "benchmarks", "samplers.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    t = bench.unet_loop_timing("digits", 2, 3, 3)
    assert t["compile_s"] > 0 and t["ours_s"] > 0 and t["theirs_s"] > 0
    assert t["ratio_min"] <= t["ratio"] <= t["ratio_max"]
