"""Class-conditional DDPM on Fashion-MNIST (70,000 28x28 grayscale images, 10 classes), padded to 32x32.

Needs the Debian package `dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist) or
--config.data.data_dir pointing at the IDX files.

    diffusion-jax train --config configs/fashion_mnist.py --workdir workdirs/fmnist
    diffusion-jax train --config configs/fashion_mnist.py:debug --workdir /tmp/fmnist   # smoke test
    diffusion-jax train --config configs/fashion_mnist.py:cpu --workdir workdirs/fmnist_cpu

The full run (100k steps, batch 128) is meant for an accelerator; on 2 CPU cores use :debug.
`:cpu` is the CPU-scale class-conditional model of experiments/guidance_fashion_mnist.py: 16x16, a 32-channel
U-Net (1, 2) with one res block per level, 2,000 steps of batch 64 with label dropout 0.1 (for classifier-free
guidance); the digits recipe (lr 2e-3 cosine, EMA 0.995). Measured 0.9 s/step on 2 CPU cores shared with another
job (~30 min); estimated ~0.45 s/step (~15 min) on idle ones.
`:cpu-v` is that model in the digits default's parameterisation, v-prediction on the cosine schedule: the teacher of
the few-step students of experiments/distill.py --data fashion_mnist (progressive distillation needs a v / x0
teacher).
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "debug", "cpu", "cpu-v"):
        raise ValueError(f"configs/fashion_mnist.py takes no argument, 'debug', 'cpu' or 'cpu-v', got {arg!r}")
    if arg in ("cpu", "cpu-v"):
        return _cpu_config(get_config("debug"), v=arg == "cpu-v")
    debug = arg == "debug"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="fashion_mnist", image_size=16 if debug else 32, data_dir=None, split="train",
                  random_flip=False, seed=0)
    c.model = dict(
        image_size=c.data.get_ref("image_size"), in_channels=1, out_channels=None,
        channels=16 if debug else 64, channel_mult=(1, 2) if debug else (1, 2, 2), num_res_blocks=1 if debug else 2,
        attention_resolutions=(8,), num_heads=1 if debug else 4, dropout=0.0 if debug else 0.1,
        num_groups=8 if debug else 32, num_classes=10, context_dim=None, learn_sigma=False, dtype="float32",
    )
    c.schedule = dict(name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02, zero_terminal_snr=False)
    c.loss = dict(prediction="eps", weighting="simple", snr_gamma=5.0, loss_type="mse", cond_drop_prob=0.1)
    c.optim = dict(learning_rate=2e-4, warmup_steps=10 if debug else 1000, decay="constant", weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    c.train = dict(
        steps=20 if debug else 100_000, batch_size=16 if debug else 128, ema_decay=0.9999, ema_warmup=True,
        num_devices=0, fsdp=False, log_every=10 if debug else 200, ckpt_every=10 if debug else 5000,
        keep_checkpoints=3, async_checkpointing=True, sample_every=0 if debug else 10_000,
        sample_num=20 if debug else 100, sample_steps=10 if debug else 50,
        on_nonfinite="stop",  # a NaN / Inf loss or gradient stops the run; "skip" skips that update
    )
    c.sample = dict(sampler="ddim", steps=50, eta=0.0, spacing="leading", variance="fixed_small",
                    clip_denoised=1.0, num=100)
    c.lock()
    return c


def _cpu_config(c: ml_collections.ConfigDict, v: bool = False) -> ml_collections.ConfigDict:
    """The :debug config (16x16, a (1, 2) U-Net), widened and trained long enough to draw recognisable classes;
    v: v-prediction on the cosine schedule (as configs/digits.py) instead of eps on the linear one."""
    with c.unlocked():
        if v:
            c.schedule.update(name="cosine", beta_start=None, beta_end=None)
            c.loss.prediction = "v"
            c.sample.spacing = "trailing"
        c.model.update(channels=32, num_res_blocks=1, num_groups=8, num_heads=1, dropout=0.0)
        c.optim.update(learning_rate=2e-3, warmup_steps=100, decay="cosine")
        c.train.update(steps=2000, batch_size=64, ema_decay=0.995, log_every=100, ckpt_every=500,
                       keep_checkpoints=2, sample_every=0, sample_num=100, sample_steps=50)
    return c
