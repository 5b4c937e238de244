"""Train-step benchmark: our jitted step vs the same step of diffusers' UNet2DModel in PyTorch, in one run.

Both sides train the same U-Net (same architecture and parameter count) with AdamW, gradient clipping at 1 and
the eps-MSE loss at uniform timesteps, float32, on the same batch size:
  cifar10: the DDPM CIFAR-10 U-Net (35.7M params; Ho et al. 2020), batch 16 by default;
  digits:  the 16x16 U-Net of configs/digits.py:x16 without its class embedding (diffusers' has none), batch 64.
The two sides alternate: each round times `--steps` steps of ours, then of PyTorch, and the ratio of the two
medians is one sample; the table gives the median ratio over rounds and its range (the machine is shared).

Also reported: compile seconds (first call minus a steady step), the same after `jax.clear_caches()` with the
persistent compilation cache warm (what a second run pays), XLA's buffer sizes of the compiled step (arguments
+ temporaries; PyTorch has no equivalent on CPU), and achieved GFLOP/s (3x the forward FLOPs XLA counts, per
second) against a measured 2048^2 float32 matmul. When JAX runs on a GPU, PyTorch's side runs on it too
(`torch_device`: TF32 allowed for float32 matmuls and convolutions on both sides, as XLA's default precision does).

    python benchmarks/train_step.py [--models cifar10,digits] [--rounds 3] [--steps 3] [--torch-threads 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parallel
from diffusion_jax.config import OptimConfig
from diffusion_jax.host import reuse_host_memory
from diffusion_jax.objectives.discrete import LossConfig
from diffusion_jax.models import UNetConfig
from diffusion_jax.models.functional import count_params, make_apply_fn
from diffusion_jax.process.discrete import make_schedule
from diffusion_jax.train.state import StepOptions, create_train_state, make_optimizer, make_train_step

DEFAULT_BATCH = {"cifar10": 16, "digits": 64}


def model_config(name: str) -> UNetConfig:
    if name == "cifar10":
        return UNetConfig()  # DDPM CIFAR-10: ch 128, mult 1,2,2,2, 2 res blocks, attention at 16, dropout 0.1
    if name == "digits":
        from diffusion_jax.config import load_experiment

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        exp = load_experiment(os.path.join(root, "configs", "digits.py") + ":x16", [])[0]   # as benchmarked
        return dataclasses.replace(exp.model, num_classes=None)
    raise ValueError(f"--models: unknown model {name!r}; available: cifar10, digits")


def _median_time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class JaxSide:
    """Our train step on one device; `build()` jits it afresh (after jax.clear_caches: a persistent-cache hit)."""

    def __init__(self, cfg: UNetConfig, batch: int, dtype: str):
        self.cfg = dataclasses.replace(cfg, dtype=dtype)
        self.mesh = parallel.make_mesh(1)
        self.tx, self.lr = make_optimizer(OptimConfig(warmup_steps=0), 1000)
        self.graphdef, self.state, self.shardings = create_train_state(self.cfg, self.tx, jax.random.PRNGKey(0),
                                                                       self.mesh)
        rng = np.random.default_rng(0)
        shape = (batch, self.cfg.image_size, self.cfg.image_size, self.cfg.in_channels)
        self.batch = parallel.shard_batch({"image": rng.uniform(-1, 1, shape).astype(np.float32)}, self.mesh)
        self.build()

    def build(self):
        self.step = make_train_step(self.graphdef, make_schedule(), LossConfig(), self.tx, self.lr,
                                    StepOptions(0.9999, False, False, None), self.mesh, self.shardings)

    def run(self):
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])

    def first_call(self) -> float:
        t0 = time.perf_counter()
        self.run()
        return time.perf_counter() - t0

    def memory_mb(self) -> float:
        mem = self.step.lower(self.state, self.batch).compile().memory_analysis()
        return (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2 ** 20

    def forward_gflop(self) -> float:
        """FLOPs of one forward pass of the batch, as XLA counts them."""
        apply = make_apply_fn(self.graphdef)
        x = self.batch["image"]
        fwd = jax.jit(lambda p, x: apply(p, x, jnp.zeros(x.shape[:1])))
        return fwd.lower(self.state.params, x).compile().cost_analysis()["flops"] / 1e9


def diffusers_unet(cfg: UNetConfig):
    """diffusers' UNet2DModel with the same architecture as our UNet(cfg) (DDPM settings)."""
    from diffusers import UNet2DModel

    chans = tuple(cfg.channels * m for m in cfg.channel_mult)
    res = [cfg.image_size // 2 ** i for i in range(len(chans))]
    attn = [r in cfg.attention_resolutions for r in res]
    attn_ch = next((c for c, a in zip(chans, attn) if a), chans[0])   # our heads: num_heads of width C / num_heads
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=chans, layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.num_groups,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        dropout=cfg.dropout, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6,
        attention_head_dim=attn_ch // cfg.num_heads)


def torch_device():
    """PyTorch's side runs where JAX's does: the GPU when JAX has one (and torch sees it), else the CPU. On a GPU,
    float32 matmuls may use TF32 as XLA's default precision does (cuDNN convolutions already do by default)."""
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def torch_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_side(cfg: UNetConfig, batch: int, dtype: str = "float32"):
    """(params, one-step function, device) of diffusers' UNet2DModel trained like ours; None without torch or
    diffusers. With dtype bfloat16 the forward and backward run under torch.autocast (parameters stay float32, as
    ours do with `model.dtype=bfloat16`)."""
    try:
        import torch
        import diffusers  # noqa: F401
    except ImportError:
        return None
    dev = torch_device()
    torch.manual_seed(0)
    model = diffusers_unet(cfg).train().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    abar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), dtype=torch.float32, device=dev)
    x0 = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=dev) * 2 - 1
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def one():
        t = torch.randint(0, 1000, (batch,), device=dev)
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        with autocast:
            loss = torch.mean((model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample.float() - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        torch_sync(dev)

    one()
    return sum(p.numel() for p in model.parameters()), one, dev


def torch_ddim_loop(cfg: UNetConfig, batch: int, steps: int):
    """A function running a `steps`-step DDIM loop in diffusers (Python loop, torch.no_grad), already called once;
    None without torch. (benchmarks/samplers.py's reference side.)"""
    try:
        import torch
        from diffusers import DDIMScheduler
    except ImportError:
        return None
    dev = torch_device()
    torch.manual_seed(0)
    model = diffusers_unet(cfg).eval().to(dev)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)

    def loop():
        scheduler.set_timesteps(steps, device=dev)
        x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=dev)
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(model(x, t).sample, t, x).prev_sample
        torch_sync(dev)

    loop()
    return loop


def matmul_gflops(n: int = 2048) -> dict:
    """GFLOP/s of an n x n float32 matmul: XLA, and PyTorch when installed (the machine's practical peak)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    out = {"xla": 2 * n ** 3 / _median_time(lambda: jax.block_until_ready(mm(a)), 5) / 1e9}
    try:
        import torch
    except ImportError:
        return out
    dev = torch_device()
    t = torch.from_numpy(np.asarray(a)).to(dev)

    def product():
        t @ t
        torch_sync(dev)

    product()
    out["torch"] = 2 * n ** 3 / _median_time(product, 5) / 1e9
    return out


def bench_model(name: str, batch: int, rounds: int, steps: int, dtype: str, use_torch: bool) -> dict:
    cfg = model_config(name)
    ours = JaxSide(cfg, batch, dtype)
    first = ours.first_call()
    steady = _median_time(ours.run, 2)
    jax.clear_caches()        # in-memory caches gone: the next first call reads the persistent cache
    ours.build()
    cached = ours.first_call()
    ref = torch_side(cfg, batch, dtype) if use_torch else None
    ours_s, torch_s = [], []
    for _ in range(rounds):
        ours_s.append(_median_time(ours.run, steps))
        if ref is not None:
            torch_s.append(_median_time(ref[1], steps))
    ours_med = statistics.median(ours_s)
    gflop = 3 * ours.forward_gflop()   # forward + backward (2x forward) per step
    row = {"model": name, "batch": batch, "dtype": dtype, "params": count_params(ours.state.params),
           "compile_s": first - steady, "compile_cached_s": max(cached - steady, 0.0), "step_s": ours_med,
           "img_per_s": batch / ours_med, "gflop_per_s": gflop / ours_med, "xla_buffers_mb": ours.memory_mb()}
    if ref is not None:
        ratios = [t / o for t, o in zip(torch_s, ours_s)]
        row.update(torch_params=ref[0], torch_device=str(ref[2]), torch_step_s=statistics.median(torch_s),
                   torch_img_per_s=batch / statistics.median(torch_s), torch_gflop_per_s=gflop / statistics.median(torch_s),
                   ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    return row


def markdown(rows: list[dict], peak: dict) -> str:
    lines = ["| model | batch | ours img/s | GFLOP/s | compile | 2nd run (cache) | XLA buffers | PyTorch img/s | "
             "GFLOP/s | ours / PyTorch (range) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        theirs = (f"{r['torch_img_per_s']:.2f} | {r['torch_gflop_per_s']:.0f} | **{r['ratio']:.2f}x** "
                  f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f})") if "ratio" in r else "- | - | -"
        lines.append(f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['batch']} | {r['img_per_s']:.2f} | "
                     f"{r['gflop_per_s']:.0f} | {r['compile_s']:.1f} s | {r['compile_cached_s']:.1f} s | "
                     f"{r['xla_buffers_mb']:.0f} MB | {theirs} |")
    lines.append("")
    lines.append("Matmul 2048^2 float32: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    host_malloc = reuse_host_memory()   # first: before torch's threads and JAX's CPU backend start (host.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cifar10,digits", help="comma-separated: cifar10, digits")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 (cifar10), 64 (digits)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, then PyTorch)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's own choice")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default="results/bench", help="train_step.csv and train_step.md go here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    names = [m for m in args.models.split(",") if m]
    for name in names:
        model_config(name)   # unknown names fail before anything runs
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if not jax.config.jax_compilation_cache_dir:   # a fresh cache: the first compile is real, the second a hit
        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="diffusion_jax_bench_cache_"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); "
          f"{args.rounds} rounds x {args.steps} steps per side; host malloc policy "
          f"{'on' if host_malloc else 'off'} (diffusion_jax/host.py)")
    peak = matmul_gflops()
    rows = []
    for name in names:
        rows.append(bench_model(name, args.batch or DEFAULT_BATCH[name], args.rounds, args.steps, args.dtype,
                                not args.no_torch))
        print(markdown(rows[-1:], peak).splitlines()[2])
    from diffusion_jax.eval.report import write_table

    write_table(args.out, "train_step", rows, markdown(rows, peak))
    return rows


if __name__ == "__main__":
    main()
