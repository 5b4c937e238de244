"""VDM (Kingma, Salimans, Poole & Ho 2021, "Variational Diffusion Models"): the continuous-time VLB in bits/dim with a
learned monotone gamma(t) = -log SNR(t) on [-13.3, 5], eps prediction, antithetic time sampling; CIFAR-10 with the
released settings and CPU-scale versions on digits and Fashion-MNIST.

    diffusion-jax train --config configs/vdm.py --workdir workdirs/vdm_cifar10             # the paper's optimizer
    diffusion-jax train --config configs/vdm.py:digits --workdir workdirs/vdm_digits       # CPU
    diffusion-jax likelihood --workdir workdirs/vdm_digits --num 256                       # PF-ODE bits/dim
    diffusion-jax train --config configs/vdm.py:digits --workdir W schedule.gamma=linear   # the fixed-gamma ablation

Arg: "cifar10" (default) | "digits" | "fashion_mnist", optionally followed by ",debug". The training loss logged as
`bpd` is the VLB (diffusion + prior + reconstruction terms, also logged apart).

From google-research/vdm configs/cifar10.py: AdamW (b2 = 0.99, weight decay 0.01), lr 2e-4 with 100 warmup steps, no
decay, batch 128, EMA 0.9999, 10M steps, dropout 0.1, gamma in [-13.3, 5], 256 data levels. Not reproduced: VDM's
score network (32 res blocks of 128 channels at full 32x32 resolution, no downsampling, Fourier features of the
input); this config uses the library's U-Net with DDPM's CIFAR-10 layout instead. gamma is the learned monotone
network (the paper's "learnable_nnet"); the released CIFAR-10 config learns only the two endpoints.
"""
import ml_collections

DATASETS = {"cifar10": (32, 3, False), "digits": (16, 1, True), "fashion_mnist": (28, 1, True)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = (arg or "cifar10").split(",")
    dataset, debug = parts[0], "debug" in parts[1:]
    if dataset not in DATASETS or set(parts[1:]) - {"debug"}:
        raise ValueError(f"configs/vdm.py arg {arg!r}: expected cifar10|digits|fashion_mnist[,debug]")
    size, channels, cpu = DATASETS[dataset]
    small = cpu or debug
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="tfds:cifar10" if dataset == "cifar10" else dataset, image_size=size, data_dir=None,
                  split="train", random_flip=dataset == "cifar10", seed=0)
    c.model = dict(
        image_size=c.data.get_ref("image_size"), in_channels=channels, out_channels=None,
        channels=16 if debug else (32 if cpu else 128),
        channel_mult=(1, 2) if debug else ((1, 2, 2) if cpu else (1, 2, 2, 2)),
        num_res_blocks=1 if small else 2, attention_resolutions=(size // 2,) if small else (16,), num_heads=1,
        dropout=0.0 if small else 0.1, num_groups=8 if small else 32, num_classes=None, context_dim=None,
        learn_sigma=False, dtype="float32",
    )
    c.schedule = dict(kind="vdm", gamma="learned", gamma_min=-13.3, gamma_max=5.0)
    c.loss = dict(prediction="eps", loss_type="mse", cond_drop_prob=0.0)
    c.optim = dict(learning_rate=1e-3 if cpu else 2e-4, warmup_steps=10 if debug else 100,
                   decay="cosine" if cpu else "constant", weight_decay=0.01, b1=0.9, b2=0.99, eps=1e-8,
                   grad_clip=1.0 if cpu else 0.0)
    c.train = dict(
        steps=20 if debug else (2000 if cpu else 10_000_000), batch_size=16 if debug else (64 if cpu else 128),
        ema_decay=0.995 if small else 0.9999, ema_warmup=small,
        num_devices=0, fsdp=False, log_every=10 if debug else 100, ckpt_every=500 if small else 10_000,
        keep_checkpoints=2 if small else 3, async_checkpointing=True, sample_every=0 if small else 100_000,
        sample_num=16 if debug else 64, sample_steps=50,
        on_nonfinite="stop",
    )
    c.sample = dict(sampler="dpmpp_2m", steps=50, eta=0.0, spacing="logsnr", variance="fixed_small",
                    clip_denoised=1.0, num=64)
    c.lock()
    return c
