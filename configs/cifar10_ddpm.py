"""DDPM on CIFAR-10 with the hyper-parameters of Ho et al. 2020 (Appendix B): 35.7M-parameter U-Net
(ch 128, mult 1,2,2,2, 2 res blocks, attention at 16x16, dropout 0.1), T = 1000 linear betas 1e-4..0.02,
eps-prediction with L_simple, Adam lr 2e-4 with 5000 warmup steps, grad clip 1, batch 128, 800k steps,
EMA 0.9999, random horizontal flips.

CIFAR-10 is read through TFDS from a prepared data_dir (no downloads at run time):

    diffusion-jax train --config configs/cifar10_ddpm.py --workdir workdirs/cifar10 \
        --config.data.data_dir=/path/to/tensorflow_datasets

DDIM (Song et al. 2021) samples from this same trained model: `configs/cifar10_ddpm.py:ddim` keeps every training
setting and sets the sampling section to the DDIM paper's (eta = 0, 100 steps; the paper's CIFAR-10 runs use
the quadratic timestep selection, which this library refuses beyond ~40 steps at T = 1000 because it repeats
timesteps, so S > 40 uses the linear, "leading", selection of its other datasets):

    diffusion-jax sample --workdir workdirs/cifar10 --sampler ddim --steps 20 --spacing quadratic

For accelerators. `configs/cifar10_ddpm.py:debug` (or `:ddim,debug`) shrinks the model and run and swaps the data for the
embedded digits (3 steps of a tiny U-Net at 32x32), so the whole path runs on a laptop CPU.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = set((arg or "").split(",")) - {""}
    if args - {"debug", "ddim"}:
        raise ValueError(f"configs/cifar10_ddpm.py takes 'debug' and / or 'ddim', got {arg!r}")
    debug, ddim = "debug" in args, "ddim" in args
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="digits" if debug else "tfds:cifar10", image_size=32, data_dir=None, split="train",
                  random_flip=True, seed=0)
    c.model = dict(
        image_size=c.data.get_ref("image_size"), in_channels=1 if debug else 3, out_channels=None,
        channels=16 if debug else 128, channel_mult=(1, 2, 2, 2), num_res_blocks=1 if debug else 2,
        attention_resolutions=(16,), num_heads=1, dropout=0.1, num_groups=8 if debug else 32,
        num_classes=None, context_dim=None, learn_sigma=False, dtype="float32",
    )
    c.schedule = dict(name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02, zero_terminal_snr=False)
    c.loss = dict(prediction="eps", weighting="simple", snr_gamma=5.0, loss_type="mse", cond_drop_prob=0.0)
    c.optim = dict(learning_rate=2e-4, warmup_steps=2 if debug else 5000, decay="constant", weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    c.train = dict(
        steps=3 if debug else 800_000, batch_size=8 if debug else 128, ema_decay=0.9999, ema_warmup=False,
        num_devices=0, fsdp=False, log_every=1 if debug else 100, ckpt_every=10_000, keep_checkpoints=3,
        async_checkpointing=True, sample_every=0 if debug else 50_000, sample_num=4 if debug else 64,
        sample_steps=5 if debug else 100,
        on_nonfinite="stop",  # a NaN / Inf loss or gradient stops the run; "skip" skips that update
    )
    c.sample = dict(sampler="ddpm", steps=1000, eta=0.0, spacing="leading", variance="fixed_large",
                    clip_denoised=1.0, num=64)
    if ddim:
        c.sample.update(sampler="ddim", steps=100, eta=0.0, spacing="leading")
    c.lock()
    return c
