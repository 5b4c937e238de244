"""Train-step benchmark: our jitted step vs the same step of diffusers' UNet2DModel in PyTorch.

Both sides train the DDPM CIFAR-10 U-Net (35.7M params; Ho et al. 2020) with AdamW on the eps-MSE loss at
uniformly drawn timesteps, on the same batch size. Reported: compile seconds (first call minus a steady
step), steady-state images per second (median of timed steps), and the ratio ours / PyTorch.

    python benchmarks/train_step.py --batch 16 --steps 5        (or: diffusion-jax bench train_step ...)
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from diffusion_jax import parallel
from diffusion_jax.losses import LossConfig
from diffusion_jax.models import UNetConfig
from diffusion_jax.models.functional import count_params
from diffusion_jax.config import OptimConfig
from diffusion_jax.schedules import make_schedule
from diffusion_jax.train.state import StepOptions, create_train_state, make_optimizer, make_train_step


def _timed(fn, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_jax(cfg: UNetConfig, batch: int, steps: int, dtype: str) -> dict:
    cfg = UNetConfig(**{**cfg.__dict__, "dtype": dtype})
    mesh = parallel.make_mesh(1)
    tx, lr = make_optimizer(OptimConfig(warmup_steps=0), 1000)
    graphdef, state, shardings = create_train_state(cfg, tx, jax.random.PRNGKey(0), mesh)
    step = make_train_step(graphdef, make_schedule(), LossConfig(), tx, lr, StepOptions(0.9999, False, False, None),
                           mesh, shardings)
    rng = np.random.default_rng(0)
    data = {"image": rng.uniform(-1, 1, (batch, cfg.image_size, cfg.image_size, cfg.in_channels)).astype(np.float32)}
    data = parallel.shard_batch(data, mesh)
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

    first = _timed(one, 1)[0]
    times = _timed(one, steps)
    med = statistics.median(times)
    return {"params": count_params(state.params), "compile_s": first - med, "step_s": med, "img_per_s": batch / med}


def diffusers_unet(cfg: UNetConfig):
    """diffusers' UNet2DModel with the same architecture as our UNet(cfg) (DDPM settings)."""
    from diffusers import UNet2DModel

    chans = tuple(cfg.channels * m for m in cfg.channel_mult)
    res = [cfg.image_size // 2 ** i for i in range(len(chans))]
    attn = [r in cfg.attention_resolutions for r in res]
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=chans, layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.num_groups,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        dropout=cfg.dropout, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)


def bench_torch_module(cfg: UNetConfig, batch: int, steps: int, repeats: int) -> float | None:
    """Median seconds of a `steps`-step DDIM loop in diffusers (Python loop, torch.no_grad); None without torch."""
    try:
        import torch
        from diffusers import DDIMScheduler
    except ImportError:
        return None
    torch.manual_seed(0)
    model = diffusers_unet(cfg).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)

    def loop():
        scheduler.set_timesteps(steps)
        x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(model(x, t).sample, t, x).prev_sample
        return x

    loop()
    return statistics.median(_timed(loop, repeats))


def bench_torch(cfg: UNetConfig, batch: int, steps: int, threads: int | None) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = diffusers_unet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    abar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), dtype=torch.float32)
    x0 = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size) * 2 - 1

    def one():
        t = torch.randint(0, 1000, (batch,))
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.mean((model(xt, t).sample - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    model.train()
    _timed(one, 1)
    med = statistics.median(_timed(one, steps))
    return {"params": sum(p.numel() for p in model.parameters()), "step_s": med, "img_per_s": batch / med,
            "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up / compile step)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's own choice")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    cfg = UNetConfig()  # DDPM CIFAR-10: ch 128, mult 1,2,2,2, 2 res blocks, attention at 16, dropout 0.1
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); "
          f"batch {args.batch}, {args.steps} timed steps")
    ours = bench_jax(cfg, args.batch, args.steps, args.dtype)
    print(f"diffusion_jax  params {ours['params']:,}  compile {ours['compile_s']:.1f} s  "
          f"step {ours['step_s'] * 1e3:.0f} ms  {ours['img_per_s']:.1f} img/s ({args.dtype})")
    ref = None if args.no_torch else bench_torch(cfg, args.batch, args.steps, args.torch_threads)
    if ref is None:
        print("PyTorch reference skipped (torch + diffusers not installed, or --no-torch)")
    else:
        print(f"diffusers/torch params {ref['params']:,}  step {ref['step_s'] * 1e3:.0f} ms  "
              f"{ref['img_per_s']:.1f} img/s (float32, {ref['threads']} threads)")
        print(f"ratio diffusion_jax / torch img/s: {ours['img_per_s'] / ref['img_per_s']:.2f}x")
    return {"jax": ours, "torch": ref}


if __name__ == "__main__":
    main()
