"""The KL autoencoder of latent diffusion (Rombach et al. 2022) at CPU scale: model.name = "vae", trained by the same
`diffusion-jax train` as every backbone (its kind, "autoencoder", picks this schema and the autoencoder's loss).

    diffusion-jax train --config configs/vae.py:fashion_mnist --workdir workdirs/vae_fmnist
    diffusion-jax train --config configs/vae.py:debug --workdir /tmp/vae          # smoke test (seconds)

fashion_mnist: 32x32 grayscale (Fashion-MNIST resized from 28x28), f = 4 (two stride-2 stages:
block_out_channels (16, 32, 32)), 4 latent channels, so a 32x32x1 image becomes an 8x8x4 latent (4x fewer numbers; SD's
f = 8, c = 4 gives 48x on RGB). L1 reconstruction, KL weight 1e-6 (LDM's kl-f8), no discriminator (set
loss.discriminator to a DiscriminatorConfig dict, e.g. {"in_channels": 1, "channels": 32, "num_layers": 2,
"norm_num_groups": 8}, to add LDM's PatchGAN). Needs `apt-get install -y dataset-fashion-mnist`.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "fashion_mnist", "debug"):
        raise ValueError(f"configs/vae.py takes 'fashion_mnist' (default) or 'debug', got {arg!r}")
    debug = arg == "debug"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="digits" if debug else "fashion_mnist", image_size=16 if debug else 32, data_dir=None,
                  split="train", random_flip=False, seed=0)
    c.model = dict(name="vae", in_channels=1, out_channels=1, block_out_channels=(8, 16) if debug else (16, 32, 32),
                   layers_per_block=1, latent_channels=4, norm_num_groups=8, scaling_factor=1.0, shift_factor=None,
                   use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True, dtype="float32")
    c.loss = dict(reconstruction="l1", kl_weight=1e-6, sample_posterior=True, disc_weight=0.5, disc_start=0,
                  discriminator=None)
    c.optim = dict(learning_rate=1e-3, warmup_steps=10 if debug else 100, decay="cosine", weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    c.train = dict(steps=20 if debug else 1500, batch_size=16 if debug else 32, log_every=10 if debug else 100,
                   ckpt_every=20 if debug else 1000, keep_checkpoints=2, async_checkpointing=True, num_devices=0,
                   sample_every=0, on_nonfinite="stop", eval_split="test", eval_num=64 if debug else 1000,
                   scale_num=128 if debug else 2048)
    c.lock()
    return c
