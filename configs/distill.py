"""Few-step students of the default digits model (configs/digits.py) or of the Fashion-MNIST CPU model
(configs/fashion_mnist.py:cpu-v), as run by experiments/distill.py:

    diffusion-jax train --config configs/digits.py --workdir workdirs/digits                         # the teacher
    # progressive distillation (Salimans & Ho 2022): 32 -> 16 teacher DDIM steps, then one run per halving
    diffusion-jax train --config configs/distill.py:progressive --workdir workdirs/pd-16 \\
        --config.distill.teacher=workdirs/digits --config.distill.student_steps=16
    diffusion-jax train --config configs/distill.py:progressive --workdir workdirs/pd-8 \\
        --config.distill.teacher=workdirs/pd-16 --config.distill.student_steps=8
    diffusion-jax sample --workdir workdirs/pd-8 --sampler ddim --steps 8 --spacing trailing --clip 0 --out pd8.png
    # consistency distillation (Song et al. 2023) and improved consistency training (Song & Dhariwal 2023)
    diffusion-jax train --config configs/distill.py:cd --workdir workdirs/cd \\
        --config.distill.teacher=workdirs/digits
    diffusion-jax train --config configs/distill.py:ct --workdir workdirs/ct
    diffusion-jax sample --workdir workdirs/cd --sampler consistency --steps 2 --spacing trailing --clip 0 --out cd.png
    # guidance distillation (Meng et al. 2023): the student takes w as input, then progressive rounds of it
    diffusion-jax train --config configs/distill.py:guidance --workdir workdirs/guided \\
        --config.distill.teacher=workdirs/digits
    diffusion-jax train --config configs/distill.py:guided-pd --workdir workdirs/guided-pd-16 \\
        --config.distill.teacher=workdirs/guided --config.distill.student_steps=16
    diffusion-jax sample --workdir workdirs/guided-pd-16 --sampler ddim --steps 16 --spacing trailing --clip 0 \\
        --guidance-scale 2 --out w2.png

A student shares its teacher's model, schedule and loss.prediction (train refuses a teacher that differs, naming the
key) and starts from its EMA weights; each run resumes like any other. The argument picks the method: "progressive",
"cd", "ct", "guidance", "guided-pd" or "guided-cd"; add ",fashion_mnist" (e.g. "cd,fashion_mnist") for students of a
configs/fashion_mnist.py:cpu-v teacher, or ",debug" for a smoke test on a configs/digits.py:debug teacher.
"""
import os

import ml_collections

from diffusion_jax.config import load_config_file

METHODS = {"progressive": "progressive", "cd": "consistency_distillation", "ct": "consistency_training",
           "guidance": "guidance", "guided-pd": "progressive",
           "guided-cd": "consistency_distillation"}
# A student taking the guidance weight w as input (Meng et al. 2023): "guidance" learns the teacher's classifier-free
# guided prediction for w ~ U[W_RANGE] ("stage one"), "guided-pd" is a progressive round of such a student (w given to
# teacher and student alike, "stage two"), "guided-cd" consistency distillation with the teacher's one ODE step guided
# at the student's w (LCM, Luo et al. 2023).
W_STUDENT = {"guidance_embed_dim": 64}
W_RANGE = (1.0, 4.0)
# The teacher's config of each option after the method: the student shares its model, schedule and prediction.
BASES = {"": "digits.py", "debug": "digits.py:debug", "fashion_mnist": "fashion_mnist.py:cpu-v"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    method, _, base = (arg or "").partition(",")
    if method not in METHODS or base not in BASES:
        raise ValueError(f"configs/distill.py takes one of {sorted(METHODS)}, optionally followed by ',fashion_mnist' "
                         f"or ',debug' (e.g. 'cd,debug'), got {arg!r}")
    debug = base == "debug"
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), BASES[base]))
    c.unlock()
    pd = METHODS[method] == "progressive"
    c.distill = dict(method=METHODS[method], teacher=None, student_steps=16 if pd else 0, spacing="trailing",
                     num_scales=1000 if method == "guidance" else 32, solver="heun", w_min=W_RANGE[0],
                     w_max=W_RANGE[1])
    if method.startswith("guid"):
        c.model.update(W_STUDENT)
    if method == "ct":   # from scratch on EDM's levels, the teacher's recipe otherwise
        c.schedule = dict(kind="edm", name="cosine", num_timesteps=1000)
        c.loss.prediction = "edm"
        c.train.steps = 20 if debug else 5000
    else:                # fine-tuning from the teacher's weights: a smaller, decaying rate without warmup
        c.optim.learning_rate, c.optim.warmup_steps = 5e-4, 0
        c.train.steps = 20 if debug else (1000 if method in ("progressive", "guidance", "guided-pd") else 2500)
    c.sample.sampler = "consistency" if METHODS[method].startswith("consistency") else "ddim"
    c.sample.steps = c.distill.get_ref("student_steps") if pd else (50 if method == "guidance" else 1)
    c.sample.clip_denoised = 0.0
    c.lock()
    return c
