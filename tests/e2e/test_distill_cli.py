"""`diffusion-jax train` with a distillation / consistency config naming a teacher workdir: a progressive round and
consistency training resume mid-run bit-identical, a consistency-distilled student samples in 1-2 steps, and a
missing or incompatible teacher is refused by name before anything compiles."""
import os
import shutil

import numpy as np
import pytest
from conftest import DIGITS, TINY, checkpoint_state

from diffusion_jax.cli.main import main
from diffusion_jax.train.metrics import read_metrics, truncate_metrics

FLAGS = [f"--config.{o}" for o in TINY if not o.startswith(("train.steps", "train.ckpt_every"))]
METHODS = {
    "progressive": ["distill.method=progressive", "distill.student_steps=2"],
    "consistency_training": ["distill.method=consistency_training", "schedule.kind=edm", "loss.prediction=edm",
                             "distill.s1=40"],
}


def train_argv(workdir, *overrides, steps=4):
    return ["train", "--config", DIGITS + ":debug", "--workdir", str(workdir), "--no-progress", *FLAGS,
            f"--config.train.steps={steps}", "--config.train.ckpt_every=2", *[f"--config.{o}" for o in overrides]]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_student_resumed_mid_run_ends_bit_identical(tmp_path, trained_workdir, capsys, caplog, method):
    teacher = [f"distill.teacher={trained_workdir}"] if method == "progressive" else []
    argv = train_argv(tmp_path, *METHODS[method], *teacher)
    assert main(argv) == 0, capsys.readouterr().err
    uninterrupted = checkpoint_state(tmp_path)
    losses = [r["loss"] for r in read_metrics(str(tmp_path))]
    shutil.rmtree(os.path.join(tmp_path, "checkpoints", "4"))   # as if killed after the step-2 checkpoint
    truncate_metrics(str(tmp_path), 2)
    with caplog.at_level("INFO", logger="diffusion_jax.train.runner"):
        assert main(argv) == 0, capsys.readouterr().err
    assert f"resuming from {os.path.join(tmp_path, 'checkpoints', '2')} (step 2)" in caplog.text
    for a, b in zip(checkpoint_state(tmp_path), uninterrupted):
        np.testing.assert_array_equal(a, b)
    assert [r["loss"] for r in read_metrics(str(tmp_path))] == losses and np.all(np.isfinite(losses))


def test_consistency_distillation_from_a_teacher_workdir_samples_in_one_and_two_steps(tmp_path, trained_workdir,
                                                                                        capsys):
    student = tmp_path / "cd"
    argv = train_argv(student, "distill.method=consistency_distillation", f"distill.teacher={trained_workdir}",
                      "distill.num_scales=4", "distill.solver=dpm_solver_2", steps=2)
    assert main(argv) == 0, capsys.readouterr().err
    assert os.listdir(student / "samples")          # the training grid: one consistency step (train/distill.py)
    out = tmp_path / "cm2.npz"
    assert main(["sample", "--workdir", str(student), "--sampler", "consistency", "--steps", "2", "--spacing",
                 "trailing", "--num", "4", "--out", str(tmp_path / "cm2.png"), "--npz", str(out)]) == 0, \
        capsys.readouterr().err
    x = np.load(out)["x"]
    assert x.shape == (4, 8, 8, 1) and np.all(np.isfinite(x))


@pytest.mark.slow    # about 40 s: two distillation runs and two sampling runs through the CLI
def test_a_guidance_distilled_student_and_its_progressive_round_take_w_as_input(tmp_path, trained_workdir, capsys):
    """Meng et al. 2023: stage one learns the guided teacher with w as input; stage two halves its steps, teacher and
    student both taking w, which reaches the network when it samples."""
    takes_w = ["model.guidance_embed_dim=8", "distill.w_min=1", "distill.w_max=4", "optim.warmup_steps=0"]
    guided, pd = tmp_path / "guided", tmp_path / "pd"
    assert main(train_argv(guided, "distill.method=guidance", f"distill.teacher={trained_workdir}",
                           "distill.num_scales=8", *takes_w, steps=2)) == 0, capsys.readouterr().err
    round_two = ["distill.method=progressive", "distill.student_steps=2", f"distill.teacher={guided}"]
    assert main(train_argv(pd, *round_two)) == 2                      # a student of a w-teacher must take w
    assert "takes the guidance weight as input (model.guidance_embed_dim=8); its student must too" in \
        capsys.readouterr().err
    assert main(train_argv(pd, *round_two, *takes_w, steps=2)) == 0, capsys.readouterr().err
    x = {}
    for w in (1, 3):    # w reaches the network through the CLI (its guidance projection moved off zero in training)
        out = tmp_path / f"w{w}.npz"
        assert main(["sample", "--workdir", str(pd), "--sampler", "ddim", "--steps", "2", "--spacing", "trailing",
                     "--guidance-scale", str(w), "--num", "4", "--out", str(tmp_path / f"w{w}.png"), "--npz",
                     str(out)]) == 0, capsys.readouterr().err
        x[w] = np.load(out)["x"]
    assert x[3].shape == (4, 8, 8, 1) and np.all(np.isfinite(x[3])) and not np.array_equal(x[1], x[3])


@pytest.mark.parametrize("overrides,message", [
    (["distill.method=progressive", "distill.student_steps=2", "distill.teacher={missing}"],
     "distill.teacher={missing!r}"),
    (["distill.method=consistency_distillation", "distill.teacher={teacher}", "model.channels=16"],
     "its model.channels=8, this student's is 16"),
    (["distill.method=progressive", "distill.student_steps=2", "distill.teacher={teacher}", "loss.prediction=x0"],
     "it predicts 'v'"),
    (["distill.method=consistency_distillation", "distill.teacher={teacher}", "distill.solver=ddpm"],
     "distill.solver='ddpm' is stochastic"),
])
def test_a_missing_or_incompatible_teacher_is_refused_by_name(tmp_path, trained_workdir, capsys, overrides, message):
    fill = dict(missing=str(tmp_path / "nowhere"), teacher=trained_workdir)
    argv = train_argv(tmp_path / "student", *[o.format(**fill) for o in overrides])
    assert main(argv) == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert not os.path.isdir(tmp_path / "student" / "checkpoints")
