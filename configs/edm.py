"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): sigma(t) = t,
preconditioning c_skip / c_out / c_in / c_noise, ln sigma ~ N(-1.2, 1.2^2) and lambda(sigma) = 1 / c_out^2, the
2nd-order Heun sampler with 18 steps (35 NFE) on the rho = 7 grid; CIFAR-10 with the paper's DDPM++ settings and
CPU-scale versions on digits and Fashion-MNIST.

    diffusion-jax train --config configs/edm.py --workdir workdirs/edm_cifar10            # the paper's run
    diffusion-jax train --config configs/edm.py:digits --workdir workdirs/edm_digits      # CPU: 2000 x 64 images
                                          # (about 50 img/s on 2 busy CPU cores: ~45 min)
    diffusion-jax sample --workdir workdirs/edm_digits --sampler edm --steps 18 --spacing karras   # 35 NFE

Arg: "cifar10" (default) | "digits" | "fashion_mnist", optionally followed by ",debug".

Paper settings (Table 7, config F for unconditional CIFAR-10, VP architecture = DDPM++): batch 512, Adam lr 1e-3
with a 10 Mimg linear ramp-up (19,531 steps), 200 Mimg (390,625 steps), EMA half-life 0.5 Mimg (decay
0.5 ** (512 / 5e5) = 0.99929 per step), dropout 0.13, no gradient clipping; 128 channels, mult (2, 2, 2),
4 res blocks, attention at 16, BigGAN-style resampling in the res blocks with the [1, 1] filter (plain), skip
scaling 1/sqrt(2), positional embedding of c_noise. sigma_data = 0.5, sigma in [0.002, 80].
Not reproduced: the non-leaking augmentation pipeline (p = 0.12); EDM's one attention block per decoder level.
"""
import ml_collections

DATASETS = {"cifar10": (32, 3, False), "digits": (16, 1, True), "fashion_mnist": (28, 1, True)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = (arg or "cifar10").split(",")
    dataset, debug = parts[0], "debug" in parts[1:]
    if dataset not in DATASETS or set(parts[1:]) - {"debug"}:
        raise ValueError(f"configs/edm.py arg {arg!r}: expected cifar10|digits|fashion_mnist[,debug]")
    size, channels, cpu = DATASETS[dataset]
    small = cpu or debug
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="tfds:cifar10" if dataset == "cifar10" else dataset, image_size=size, data_dir=None,
                  split="train", random_flip=dataset == "cifar10", seed=0)
    c.model = dict(
        image_size=c.data.get_ref("image_size"), in_channels=channels, out_channels=None,
        channels=16 if debug else (32 if cpu else 128),
        channel_mult=(1, 2) if debug else ((1, 2, 2) if cpu else (2, 2, 2)),
        num_res_blocks=1 if small else 4, attention_resolutions=(size // 2,) if small else (16,), num_heads=1,
        dropout=0.0 if small else 0.13, num_groups=8 if small else 32, num_classes=None, context_dim=None,
        learn_sigma=False, dtype="float32", time_embedding="positional", fourier_scale=16.0,
        fourier_log_input=False, resblock="biggan", resample_filter="plain", skip_rescale=True,
    )
    c.schedule = dict(kind="edm", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    c.loss = dict(prediction="edm", p_mean=-1.2, p_std=1.2, loss_type="mse", cond_drop_prob=0.0)
    c.optim = dict(learning_rate=2e-3 if cpu else 1e-3, warmup_steps=10 if debug else (100 if cpu else 19_531),
                   decay="cosine" if cpu else "constant", weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                   grad_clip=0.0)
    c.train = dict(
        steps=20 if debug else (2000 if cpu else 390_625), batch_size=16 if debug else (64 if cpu else 512),
        ema_decay=0.995 if small else 0.99929, ema_warmup=small,
        num_devices=0, fsdp=False, log_every=10 if debug else 100, ckpt_every=500 if small else 25_000,
        keep_checkpoints=2 if small else 3, async_checkpointing=True, sample_every=0 if small else 25_000,
        sample_num=16 if debug else 64, sample_steps=18, on_nonfinite="stop",
    )
    c.sample = dict(sampler="edm", steps=18, eta=0.0, spacing="karras", variance="fixed_small",
                    clip_denoised=0.0, num=64)
    c.lock()
    return c
