"""DreamBooth (Ruiz et al. 2023) on the default digits model: the subject is five held-out 3s written bold
(configs/subjects/bold_three, grey dilation of test-split digits; `experiments/dreambooth_digits.py` writes them),
bound to the new label 10 ([V], its embedding the 3's plus an offset; the null label moves to 11), with 200 class images of label 3 drawn by the frozen base
for prior preservation (lambda = 1). Every parameter of the U-Net trains, 400 steps (about a minute on 2 CPU cores):

    diffusion-jax train --config configs/digits.py --workdir workdirs/digits
    diffusion-jax train --config configs/dreambooth_digits.py --workdir workdirs/digits_dreambooth \\
        --config.model.base_workdir=workdirs/digits [--config.model.prior_loss_weight=0]   # 0: no prior
    diffusion-jax sample --workdir workdirs/digits_dreambooth --label 10 --num 100 --out subject.png   # [V] 3
    diffusion-jax sample --workdir workdirs/digits_dreambooth --label 3 --num 100 --out threes.png     # the class
    diffusion-jax export --workdir workdirs/digits_dreambooth --to exported/digits_dreambooth   # a UNet2DModel

Any folder of subject images works (`--config.data.data_dir=...`; grey images with data.grayscale=True), with the
subject's class as model.class_label. The schedule and loss are the base run's (train refuses others). `:debug` is a
smoke test on top of a configs/digits.py:debug run.
"""
import os

import ml_collections

SUBJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "subjects", "bold_three")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "debug"):
        raise ValueError(f"configs/dreambooth_digits.py takes no argument or 'debug', got {arg!r}")
    debug = arg == "debug"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="folder", image_size=8, data_dir=SUBJECT, split="train", random_flip=False, seed=0,
                  grayscale=True)
    c.model = dict(name="dreambooth", base_workdir="workdirs/digits", class_label=3,
                   num_class_images=20 if debug else 200, prior_loss_weight=1.0, identifier_offset=0.5)
    c.schedule = dict(name="cosine", num_timesteps=1000, zero_terminal_snr=False, beta_start=None, beta_end=None)
    c.loss = dict(prediction="v", weighting="simple", snr_gamma=5.0, loss_type="mse", cond_drop_prob=0.1)
    c.optim = dict(learning_rate=2e-4, warmup_steps=20, decay="cosine", weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    c.train = dict(
        steps=10 if debug else 400, batch_size=8 if debug else 32, ema_decay=0.99, ema_warmup=True,
        num_devices=0, fsdp=False, log_every=5 if debug else 50, ckpt_every=200, keep_checkpoints=2,
        async_checkpointing=True, sample_every=0, sample_num=22 if debug else 110, sample_steps=10 if debug else 50,
        on_nonfinite="stop",
    )
    c.sample = dict(sampler="ddim", steps=10 if debug else 50, eta=0.0, spacing="trailing", variance="fixed_small",
                    clip_denoised=1.0, num=100)
    c.lock()
    return c
