"""Score SDEs (Song et al. 2021, "Score-Based Generative Modeling through SDEs"): continuous-time DSM on the VP,
sub-VP or VE SDE, with the paper's CIFAR-10 models (DDPM++ cont. for VP / sub-VP, NCSN++ cont. for VE) and a
CPU-scale version of each on digits or Fashion-MNIST.

    diffusion-jax train --config configs/score_sde.py:vp --workdir workdirs/vp_cifar10        # the paper's run
    diffusion-jax train --config configs/score_sde.py:ve,digits --workdir workdirs/ve_digits  # CPU: 2000 x 64 images
    diffusion-jax train --config configs/score_sde.py:subvp,fashion_mnist,debug --workdir /tmp/t   # smoke test

Arg: "vp" | "subvp" | "ve", then optionally "cifar10" (default) | "digits" | "fashion_mnist", then "debug".

Paper settings (score_sde's configs/{vp,subvp}/cifar10_ddpmpp_continuous.py, ve/cifar10_ncsnpp_continuous.py):
Adam lr 2e-4, warmup 5000, grad clip 1, batch 128, 1.3M iterations; beta in [0.1, 20] (VP / sub-VP), sigma in
[0.01, 50] (VE); EMA 0.9999 (DDPM++) / 0.999 (NCSN++); 128 channels, mult (1, 2, 2, 2), 4 res blocks, attention at
16, BigGAN res blocks, skip rescaling, dropout 0.1; NCSN++ adds Fourier features of log sigma and FIR resampling.
Samplers: Euler-Maruyama, 1000 steps (VP / sub-VP); reverse diffusion + Langevin corrector, snr 0.16 (VE).
Differences, all deliberate: data in [-1, 1] for VE too (score_sde feeds NCSN++ [0, 1] data); the loss is a mean
over pixels (reduce_mean) for every SDE, which only rescales the gradient Adam normalises; NCSN++'s progressive
input pyramid is not implemented; one attention block after each res block at 16x16 (as the DDPM U-Net).
"""
import ml_collections

DATASETS = {  # name: (image_size, channels, CPU-scale?)
    "cifar10": (32, 3, False), "digits": (16, 1, True), "fashion_mnist": (28, 1, True)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = (arg or "vp").split(",")
    kind, debug = parts[0], "debug" in parts[1:]
    dataset = next((p for p in parts[1:] if p != "debug"), "cifar10")
    extra = [p for p in parts[1:] if p != "debug"]
    if kind not in ("vp", "subvp", "ve") or dataset not in DATASETS or len(extra) > 1:
        raise ValueError(f"configs/score_sde.py arg {arg!r}: expected vp|subvp|ve[,cifar10|digits|fashion_mnist]"
                         "[,debug]")
    size, channels, cpu = DATASETS[dataset]
    ve = kind == "ve"
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.data = dict(name="tfds:cifar10" if dataset == "cifar10" else dataset, image_size=size, data_dir=None,
                  split="train", random_flip=dataset == "cifar10", seed=0)
    c.model = dict(
        image_size=c.data.get_ref("image_size"), in_channels=channels, out_channels=None,
        channels=16 if debug else (32 if cpu else 128),
        channel_mult=(1, 2) if debug else ((1, 2, 2) if cpu else (1, 2, 2, 2)),
        num_res_blocks=1 if (debug or cpu) else 4,
        attention_resolutions=(size // 2,) if (debug or cpu) else (16,), num_heads=1,
        dropout=0.0 if (debug or cpu) else 0.1, num_groups=8 if (debug or cpu) else 32,
        num_classes=None, context_dim=None, learn_sigma=False, dtype="float32",
        time_embedding="fourier" if ve else "positional", fourier_scale=16.0, fourier_log_input=True,
        resblock="biggan", resample_filter="fir" if ve else "plain", skip_rescale=True,
    )
    c.schedule = dict(kind=kind, beta_min=None if ve else 0.1, beta_max=None if ve else 20.0,
                      sigma_min=0.01 if ve else None, sigma_max=50.0 if ve else None)
    # eps-prediction is score_sde's scale_by_sigma / -model / std: score = -eps_hat / sigma.
    c.loss = dict(prediction="eps", weighting="simple", loss_type="mse", cond_drop_prob=0.0, eps=1e-5,
                  importance_sampling=False)
    c.optim = dict(learning_rate=2e-3 if cpu else 2e-4, warmup_steps=10 if debug else (100 if cpu else 5000),
                   decay="cosine" if cpu else "constant", weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                   grad_clip=1.0)
    c.train = dict(
        steps=20 if debug else (2000 if cpu else 1_300_000), batch_size=16 if debug else (64 if cpu else 128),
        ema_decay=0.995 if cpu or debug else (0.999 if ve else 0.9999), ema_warmup=cpu or debug,
        num_devices=0, fsdp=False, log_every=10 if debug else 100, ckpt_every=500 if cpu or debug else 50_000,
        keep_checkpoints=2 if cpu or debug else 3, async_checkpointing=True,
        sample_every=0 if cpu or debug else 50_000, sample_num=16 if debug else 64,
        sample_steps=10 if debug else 50, on_nonfinite="stop",
    )
    c.sample = dict(sampler="pc" if ve else "euler_maruyama", steps=1000, eta=0.0, spacing="uniform",
                    variance="fixed_small", clip_denoised=0.0, num=64)
    c.lock()
    return c
