"""LoRA (Hu et al. 2021) fine-tuning of the default digits model: rank-4 updates of the attention projections (q, k, v,
proj_out; 5,120 trained parameters against the base's 650,033, 0.8%) on the 180 held-out digits, the base locked:

    diffusion-jax train --config configs/digits.py --workdir workdirs/digits
    diffusion-jax train --config configs/lora_digits.py --workdir workdirs/digits_lora \\
        --config.model.base_workdir=workdirs/digits [--config.model.targets='("q","k","v","proj_out","conv1","conv2")']
    diffusion-jax sample --workdir workdirs/digits_lora --num 100 --out lora.png
    diffusion-jax export --workdir workdirs/digits_lora --to exported/digits_lora    # pytorch_lora_weights.safetensors
    diffusion-jax sample --workdir workdirs/digits --lora exported/digits_lora --lora-scale 0.5   # merged into the base

The schedule, loss and data resolution are the base run's (train refuses a schedule or prediction that differs from
model.base_workdir's). `:debug` is a smoke test on top of a configs/digits.py:debug run.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "debug"):
        raise ValueError(f"configs/lora_digits.py takes no argument or 'debug', got {arg!r}")
    debug = arg == "debug"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="digits", image_size=8, data_dir=None, split="test", random_flip=False, seed=0)
    c.model = dict(name="lora", base_workdir="workdirs/digits", rank=4, alpha=4.0, targets=())
    c.schedule = dict(name="cosine", num_timesteps=1000, zero_terminal_snr=False, beta_start=None, beta_end=None)
    c.loss = dict(prediction="v", weighting="simple", snr_gamma=5.0, loss_type="mse", cond_drop_prob=0.1)
    c.optim = dict(learning_rate=1e-3, warmup_steps=20, decay="cosine", weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    c.train = dict(
        steps=10 if debug else 500, batch_size=16 if debug else 64, ema_decay=0.99, ema_warmup=True,
        num_devices=0, fsdp=False, log_every=5 if debug else 50, ckpt_every=250, keep_checkpoints=2,
        async_checkpointing=True, sample_every=0, sample_num=20 if debug else 100, sample_steps=10 if debug else 50,
        on_nonfinite="stop",
    )
    c.sample = dict(sampler="ddim", steps=50, eta=0.0, spacing="trailing", variance="fixed_small", clip_denoised=1.0,
                    num=100)
    c.lock()
    return c
