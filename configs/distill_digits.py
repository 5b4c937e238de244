"""Few-step students of the default digits model (configs/digits.py), as run by experiments/distill_digits.py:

    diffusion-jax train --config configs/digits.py --workdir workdirs/digits                         # the teacher
    # progressive distillation (Salimans & Ho 2022): 32 -> 16 teacher DDIM steps, then one run per halving
    diffusion-jax train --config configs/distill_digits.py:progressive --workdir workdirs/pd-16 \\
        --config.distill.teacher=workdirs/digits --config.distill.student_steps=16
    diffusion-jax train --config configs/distill_digits.py:progressive --workdir workdirs/pd-8 \\
        --config.distill.teacher=workdirs/pd-16 --config.distill.student_steps=8
    diffusion-jax sample --workdir workdirs/pd-8 --sampler ddim --steps 8 --spacing trailing --clip 0 --out pd8.png
    # consistency distillation (Song et al. 2023) and improved consistency training (Song & Dhariwal 2023)
    diffusion-jax train --config configs/distill_digits.py:cd --workdir workdirs/cd \\
        --config.distill.teacher=workdirs/digits
    diffusion-jax train --config configs/distill_digits.py:ct --workdir workdirs/ct
    diffusion-jax sample --workdir workdirs/cd --sampler consistency --steps 2 --spacing trailing --clip 0 --out cd.png

A student shares its teacher's model, schedule and loss.prediction (train refuses a teacher that differs, naming the
key) and starts from its EMA weights; each run resumes like any other. The argument picks the method: "progressive",
"cd" or "ct"; add ",debug" (e.g. "cd,debug") for a smoke test on a configs/digits.py:debug teacher.
"""
import os

import ml_collections

from diffusion_jax.config import load_config_file

METHODS = {"progressive": "progressive", "cd": "consistency_distillation", "ct": "consistency_training"}
DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    method, _, debug = (arg or "").partition(",")
    if method not in METHODS or debug not in ("", "debug"):
        raise ValueError(f"configs/distill_digits.py takes one of {sorted(METHODS)}, optionally followed by ',debug' "
                         f"(e.g. 'cd,debug'), got {arg!r}")
    c = load_config_file(DIGITS + (":debug" if debug else ""))
    c.unlock()
    c.distill = dict(method=METHODS[method], teacher=None, student_steps=16 if method == "progressive" else 0,
                     spacing="trailing", num_scales=32, solver="heun")
    if method == "ct":   # from scratch on EDM's levels, the teacher's recipe otherwise
        c.schedule = dict(kind="edm", name="cosine", num_timesteps=1000)
        c.loss.prediction = "edm"
        c.train.steps = 20 if debug else 5000
    else:                # fine-tuning from the teacher's weights: a smaller, decaying rate without warmup
        c.optim.learning_rate, c.optim.warmup_steps = 5e-4, 0
        c.train.steps = 20 if debug else (1000 if method == "progressive" else 2500)
    c.sample.sampler = "ddim" if method == "progressive" else "consistency"
    c.sample.steps = c.distill.get_ref("student_steps") if method == "progressive" else 1
    c.sample.clip_denoised = 0.0
    c.lock()
    return c
