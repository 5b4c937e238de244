"""ControlNet (Zhang et al. 2023) on the default digits model: Canny edge maps (scikit-image) of the 8x8 digits steer the locked,
class-conditional v-prediction U-Net of configs/digits.py through a trainable copy of its encoder and zero
convolutions. Trains 1,500 steps (only the ControlNet's parameters) on 2 CPU cores in a few minutes:

    diffusion-jax train --config configs/digits.py --workdir workdirs/digits
    diffusion-jax train --config configs/controlnet_digits.py --workdir workdirs/digits_controlnet \\
        --config.model.base_workdir=workdirs/digits
    diffusion-jax sample --workdir workdirs/digits_controlnet --control-from some_digit.png --out controlled.png

The schedule, loss and data are the base run's (train refuses a schedule or prediction that differs from
model.base_workdir's). `configs/controlnet_digits.py:debug` is a smoke test on top of a configs/digits.py:debug run.
The experiment that measures it: experiments/controlnet_edges.py (docs/results.md).
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "debug"):
        raise ValueError(f"configs/controlnet_digits.py takes no argument or 'debug', got {arg!r}")
    debug = arg == "debug"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="digits", image_size=8, data_dir=None, split="train", random_flip=False, seed=0)
    c.model = dict(name="controlnet", base_workdir="workdirs/digits", condition="canny", conditioning_channels=1,
                   embedding_channels=(16,))
    c.schedule = dict(name="cosine", num_timesteps=1000, zero_terminal_snr=False, beta_start=None, beta_end=None)
    c.loss = dict(prediction="v", weighting="simple", snr_gamma=5.0, loss_type="mse", cond_drop_prob=0.1)
    c.optim = dict(learning_rate=1e-3, warmup_steps=50, decay="cosine", weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    c.train = dict(
        steps=10 if debug else 1500, batch_size=16 if debug else 64, ema_decay=0.995, ema_warmup=True,
        num_devices=0, fsdp=False, log_every=5 if debug else 100, ckpt_every=500, keep_checkpoints=2,
        async_checkpointing=True, sample_every=0, sample_num=20 if debug else 100, sample_steps=10 if debug else 50,
        on_nonfinite="stop",
    )
    c.sample = dict(sampler="ddim", steps=50, eta=0.0, spacing="trailing", variance="fixed_small", clip_denoised=1.0,
                    num=100)
    c.lock()
    return c
