"""Continuous-time training end to end: schedule.kind picks the schedule and its loss (objectives.py), the
trained run samples with a grid sampler, and the config refuses combinations that cannot work. (schedule.kind="flow"
trains end to end with the DiT in tests/e2e/test_backbones.py.)"""
import dataclasses
import os

import jax
import numpy as np
import pytest
from conftest import DIGITS, TINY
from conftest import ROOT as ROOT_DIR

from diffusion_jax.config import build_schedule, learned_gamma, load_experiment
from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn
from diffusion_jax.process.sde import VESDE, EDMSchedule
from diffusion_jax.train.checkpoint import load_trained
from diffusion_jax.train.loop import train_and_evaluate
from diffusion_jax.train.metrics import read_metrics

RUNS = {
    "edm": ["schedule.kind=edm", "loss.prediction=edm", "sample.sampler=heun", "sample.spacing=karras"],
    "vp": ["schedule.kind=vp", "loss.weighting=likelihood", "loss.importance_sampling=True",
           "sample.sampler=dpmpp_2m", "sample.spacing=logsnr"],
    "vdm": ["schedule.kind=vdm", "schedule.gamma=learned", "sample.sampler=dpmpp_2m", "sample.spacing=logsnr",
            "optim.warmup_steps=0", "optim.learning_rate=0.01"],
}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k == "vdm" else k   # vdm: ~40 s
                                  for k in sorted(RUNS)])
def test_continuous_run_trains_samples_and_loads(tmp_path, kind):
    exp = load_experiment(DIGITS + ":debug", TINY + ["train.sample_steps=4"] + RUNS[kind])[0]
    train_and_evaluate(exp, str(tmp_path), progress=False)
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    exp2, graphdef, params, step = load_trained(str(tmp_path))
    assert step == 3 and exp2.schedule.kind == kind
    schedule = build_schedule(exp2.schedule, params)
    if kind == "vdm":   # the learned gamma is trained with the network, saved with it and steers sampling
        assert set(params) == {"net", "gamma"} and "bpd" in rows[-1]
        l1 = learned_gamma(exp2.schedule).init(jax.random.key(0))["l1"]     # deterministic: the linear gamma
        moved = [abs(float(params["gamma"]["l1"][k].ravel()[0] - l1[k].ravel()[0])) for k in ("w", "b")]
        assert min(moved) > 1e-4 and schedule.params is params["gamma"]
        with pytest.raises(ValueError, match="schedule.gamma='learned' is part of the trained params"):
            build_schedule(exp2.schedule)
    spec = SamplerSpec.from_config(exp2.sample)
    spec = SamplerSpec(spec.sampler, steps=3, spacing=spec.spacing, clip_denoised=1.0, options=spec.options)
    fn = make_sample_fn(graphdef, schedule, spec, (2, 8, 8, 1), prediction=exp2.loss.prediction)
    images, nfe = fn(params, jax.random.PRNGKey(0))
    assert images.shape == (2, 8, 8, 1) and np.isfinite(np.asarray(images)).all() and nfe > 0


def test_build_schedule_follows_kind_and_defaults():
    exp = load_experiment(DIGITS, ["schedule.kind=ve", "schedule.sigma_max=25.0", "sample.sampler=heun",
                                   "sample.spacing=karras"])[0]
    assert build_schedule(exp.schedule) == VESDE(sigma_max=25.0)
    exp = load_experiment(DIGITS, ["schedule.kind=edm", "loss.prediction=edm", "sample.sampler=edm",
                                   "sample.spacing=karras"])[0]
    assert build_schedule(exp.schedule) == EDMSchedule()


@pytest.mark.parametrize("overrides,match", [
    (["schedule.kind=sde"], "schedule.kind='sde' is unknown"),
    (["schedule.kind=edm", "sample.spacing=karras", "sample.sampler=heun"], "loss.prediction='edm'"),
    (["schedule.kind=vp", "schedule.sigma_max=10.0", "sample.spacing=karras"], "schedule.sigma_max does not apply"),
    (["schedule.kind=vp", "schedule.beta_min=30.0", "sample.spacing=karras"], "beta_min=30.0 must be <"),
    (["schedule.kind=vp", "sample.sampler=heun", "sample.spacing=leading"],
     "sample.spacing='leading' selects discrete"),
    (["schedule.kind=vp", "loss.loss_type=hybrid", "model.learn_sigma=True", "sample.spacing=karras"],
     "loss.loss_type='mse'"),
    (["schedule.kind=vp", "loss.importance_sampling=True", "sample.spacing=karras"], "loss.weighting='likelihood'"),
    (["schedule.kind=discrete", "schedule.sigma_data=0.5"], "schedule.sigma_data does not apply"),
    (["schedule.kind=vdm", "schedule.gamma=cosine", "sample.spacing=logsnr"], "schedule.gamma='cosine' is unknown"),
    (["schedule.gamma=learned"], "schedule.gamma applies to schedule.kind='vdm' only"),
    (["schedule.kind=vdm", "schedule.gamma_min=6.0", "sample.spacing=logsnr"], "gamma_min=6.0 must be <"),
    (["schedule.kind=vdm", "loss.weighting=likelihood", "sample.spacing=logsnr"], "VDM's continuous VLB"),
])
def test_continuous_config_errors_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        load_experiment(DIGITS, overrides)


def test_override_of_a_key_the_config_file_leaves_out_still_checks_the_name():
    with pytest.raises(ValueError, match="unknown config key 'schedule.knd'.*kind"):
        load_experiment(DIGITS, ["schedule.knd=vp"])


@pytest.mark.parametrize("spec", ["score_sde.py:vp", "score_sde.py:subvp", "score_sde.py:ve", "score_sde.py:vp,digits",
                                  "score_sde.py:ve,fashion_mnist", "score_sde.py:subvp,digits,debug", "edm.py",
                                  "edm.py:digits", "edm.py:fashion_mnist,debug", "vdm.py", "vdm.py:digits,debug"])
def test_paper_and_cpu_configs_load_and_validate(spec):
    exp = load_experiment(os.path.join(ROOT_DIR, "configs", spec))[0]
    sc = exp.schedule if exp.schedule.kind != "vdm" else dataclasses.replace(exp.schedule, gamma="linear")
    schedule = build_schedule(sc)
    assert exp.schedule.kind in ("vp", "subvp", "ve", "edm", "vdm") and schedule.t_min < schedule.t_max
    if spec == "vdm.py":   # google-research/vdm configs/cifar10.py
        assert (exp.schedule.gamma, exp.schedule.gamma_min, exp.schedule.gamma_max) == ("learned", -13.3, 5.0)
        assert (exp.optim.learning_rate, exp.optim.b2, exp.optim.weight_decay, exp.train.batch_size) == \
            (2e-4, 0.99, 0.01, 128)
    if spec == "edm.py":   # Karras et al. Table 7: batch 512, 200 Mimg, 18 Heun steps on sigma in [0.002, 80]
        assert (exp.train.batch_size, exp.train.steps, exp.sample.steps) == (512, 390_625, 18)
        assert (schedule.sigma_min, schedule.sigma_max, schedule.sigma_data) == (0.002, 80.0, 0.5)
    if spec == "score_sde.py:ve":   # NCSN++ cont.: Fourier features, FIR, sigma in [0.01, 50]
        assert exp.model.time_embedding == "fourier" and exp.model.resample_filter == "fir"
        assert (schedule.sigma_min, schedule.sigma_max) == (0.01, 50.0)


def test_config_arg_errors_name_the_expected_form():
    with pytest.raises(ValueError, match="expected vp\\|subvp\\|ve"):
        load_experiment(os.path.join(ROOT_DIR, "configs", "score_sde.py:vq"))
