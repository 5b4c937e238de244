"""benchmarks/train_step.py and benchmarks/sampling_loop.py on the digits model: both sides run the same network."""
import csv
import importlib
import os
import sys

import pytest
from conftest import ROOT
from harness import need

BENCHMARKS = os.path.join(ROOT, "benchmarks")


def bench(name: str):
    """A script under benchmarks/ as a module (they import each other by file name)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module(name)


@pytest.mark.slow    # about a minute: three compiles of the digits train step
@pytest.mark.torch
def test_train_step_bench_times_both_sides_of_the_same_network(tmp_path):
    need("diffusers")
    main = bench("train_step").main

    rows = main(["--models", "digits", "--batch", "8", "--rounds", "2", "--steps", "1", "--out", str(tmp_path)])
    (row,) = rows
    assert row["params"] == row["torch_params"]   # diffusers' UNet2DModel is the same architecture
    assert row["step_s"] > 0 and row["torch_step_s"] > 0 and row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert row["gflop_per_s"] > 0 and row["xla_buffers_mb"] > 0 and row["compile_s"] > 0
    with open(os.path.join(tmp_path, "train_step.csv")) as f:
        assert next(csv.DictReader(f))["model"] == "digits"
    assert "ours / PyTorch" in open(os.path.join(tmp_path, "train_step.md")).read()


def test_unknown_model_is_named():
    main = bench("train_step").main

    with pytest.raises(ValueError, match="unknown model 'imagenet'"):
        main(["--models", "imagenet"])


@pytest.mark.slow    # about 35 s: one compile of a 3-step DDIM loop of the digits model, and diffusers' loop
@pytest.mark.torch
def test_sampling_bench_alternates_both_sides(tmp_path):
    need("diffusers")
    bench("sampling_loop").main(["--loops", "digits:2", "--steps", "3", "--repeats", "3", "--out", str(tmp_path)])
    with open(os.path.join(tmp_path, "sampling.csv")) as f:
        (row,) = list(csv.DictReader(f))
    assert row["model"] == "digits" and row["batch"] == "2" and row["steps"] == "3"
    assert float(row["compile_s"]) > 0 and float(row["ours_s"]) > 0 and float(row["theirs_s"]) > 0
    assert float(row["xla_buffers_mb"]) > 0
    assert float(row["ratio_min"]) <= float(row["ratio"]) <= float(row["ratio_max"])
    assert "diffusers / ours" in open(os.path.join(tmp_path, "sampling.md")).read()


@pytest.mark.parametrize("loops, message", [("imagenet:4", "unknown model 'imagenet'"),
                                            ("digits", "'digits' is not MODEL:BATCH"),
                                            ("digits:0", "'digits:0' is not MODEL:BATCH")])
def test_sampling_bench_names_a_bad_loop(loops, message):
    main = bench("sampling_loop").main

    with pytest.raises(ValueError, match=message):
        main(["--loops", loops])


@pytest.mark.torch
def test_conv_layer_bench_times_both_sides(tmp_path):
    need("torch")
    convs = bench("convs")
    row = convs.time_layer(batch=2, size=4, cin=8, cout=8, repeats=2)
    assert min(row[k] for k in ("ours_fwd_ms", "ours_dx_ms", "ours_dw_ms", "torch_fwd_ms")) > 0
    assert row["ratio"] == pytest.approx(row["torch_total_ms"] / row["ours_total_ms"])
    assert "PyTorch / ours" in convs.markdown([row])
