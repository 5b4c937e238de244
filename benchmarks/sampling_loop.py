"""Sampling benchmark: our compiled DDIM loop vs diffusers' Python loop over DDIMScheduler.step, in one run.

    python benchmarks/sampling_loop.py [--loops digits:1,digits:16,digits:100,cifar10:4] [--steps 50] [--repeats 3]

Each MODEL:BATCH item runs a `--steps`-step DDIM loop (NFE = steps) on a U-Net with random weights, ours as one
jitted `lax.scan`, diffusers' as UNet2DModel (the same architecture, `train_step.diffusers_unet`) in a Python loop
over DDIMScheduler.step under torch.no_grad, on the GPU when JAX has one. The sides alternate (one loop of ours, then one of diffusers',
`--repeats` times); the ratio diffusers / ours is the median over rounds, with its range. Also reported: our
compile seconds (trace, lower and compile of the whole loop) and XLA's buffer sizes of the compiled loop
(arguments + temporaries; PyTorch has no equivalent on CPU). At small batches compilation removes the per-step
Python and dispatch overhead; at large ones the convolutions and normalisations dominate (docs/benchmarks.md).

Models: digits (configs/digits.py:x16 without its class embedding), small32 (a 32x32x3 U-Net, 1 block per level)
and cifar10 (the DDPM CIFAR-10 U-Net, 35.7M parameters). Results go to OUT/sampling.csv and OUT/sampling.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))   # train_step.py beside it

import jax

from diffusion_jax.host import reuse_host_memory

SMALL32 = dict(image_size=32, in_channels=3, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
               attention_resolutions=(16,), dropout=0.0, num_groups=8)
MODELS = ("digits", "small32", "cifar10")


def unet_config(name: str):
    from train_step import model_config
    from diffusion_jax.models import UNetConfig

    if name not in MODELS:
        raise ValueError(f"--loops: unknown model {name!r}; available: {', '.join(MODELS)}")
    return UNetConfig(**SMALL32) if name == "small32" else model_config(name)


def unet_loop_timing(name: str, batch: int, steps: int, repeats: int) -> dict:
    """A `steps`-step DDIM loop, ours and diffusers', same config and batch, timed alternately `repeats` times.

    Returns compile_s, ours_s (median seconds per loop) and xla_buffers_mb, plus theirs_s (median) and the ratio
    theirs / ours per round (ratio: median, ratio_min, ratio_max) when torch and diffusers are installed."""
    from flax import nnx

    from train_step import torch_ddim_loop
    from diffusion_jax.models import UNet
    from diffusion_jax.models.functional import make_apply_fn, split_params
    from diffusion_jax.samplers import run_sampler
    from diffusion_jax.process.discrete import make_schedule

    cfg = unet_config(name)
    graphdef, params = split_params(UNet(cfg, rngs=nnx.Rngs(0)))
    apply = make_apply_fn(graphdef)
    schedule = make_schedule("linear", 1000)
    shape = (batch, cfg.image_size, cfg.image_size, cfg.in_channels)
    loop = jax.jit(lambda p, key: run_sampler("ddim", lambda x, t: apply(p, x, t), schedule, key, shape, steps=steps,
                                              clip_denoised=1.0)[0])
    t0 = time.perf_counter()
    run = loop.lower(params, jax.random.PRNGKey(0)).compile()
    out = {"model": name, "batch": batch, "steps": steps, "compile_s": time.perf_counter() - t0}
    mem = run.memory_analysis()
    out["xla_buffers_mb"] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2 ** 20
    jax.block_until_ready(run(params, jax.random.PRNGKey(0)))
    theirs_loop = torch_ddim_loop(cfg, batch, steps)
    ours, theirs = [], []
    for r in range(repeats):   # alternate, so that load on a shared machine hits both sides alike
        t0 = time.perf_counter()
        jax.block_until_ready(run(params, jax.random.PRNGKey(r + 1)))
        ours.append(time.perf_counter() - t0)
        if theirs_loop is not None:
            t0 = time.perf_counter()
            theirs_loop()
            theirs.append(time.perf_counter() - t0)
    out.update(ours_s=statistics.median(ours), img_per_s=batch / statistics.median(ours))
    if theirs:
        ratios = [t / o for t, o in zip(theirs, ours)]
        out.update(theirs_s=statistics.median(theirs), theirs_img_per_s=batch / statistics.median(theirs),
                   ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    return out


def markdown_row(t: dict) -> str:
    theirs = (f"{t['theirs_s']:.2f} s | {t['theirs_img_per_s']:.1f} | **{t['ratio']:.2f}x** "
              f"({t['ratio_min']:.2f}-{t['ratio_max']:.2f})") if "ratio" in t else "- | - | diffusers not installed"
    return (f"| {t['model']} | {t['batch']} | {t['steps']} | {t['ours_s']:.2f} s | {t['img_per_s']:.1f} | "
            f"{t['compile_s']:.1f} s | {t['xla_buffers_mb']:.0f} MB | {theirs} |")


HEADER = ["| U-Net | batch | NFE | ours (one jitted lax.scan) | img/s | compile | XLA buffers | "
          "diffusers (Python loop) | img/s | diffusers / ours (range) |", "|---|---|---|---|---|---|---|---|---|---|"]


def parse_loops(text: str) -> list[tuple[str, int]]:
    items = []
    for item in filter(None, text.split(",")):
        name, _, batch = item.partition(":")
        if not batch.isdigit() or int(batch) < 1:
            raise ValueError(f"--loops: {item!r} is not MODEL:BATCH with a positive batch (e.g. digits:16)")
        unet_config(name)   # unknown names fail before anything runs
        items.append((name, int(batch)))
    return items


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", default="digits:1,digits:16,digits:100,cifar10:4",
                        help=f"comma-separated MODEL:BATCH (models: {', '.join(MODELS)})")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps = network evaluations (NFE)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (ours, then diffusers)")
    parser.add_argument("--out", default="results/bench", help="sampling.csv and sampling.md go here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    loops = parse_loops(args.loops)   # bad input fails before anything starts
    reuse_host_memory()   # before JAX's CPU backend and torch start (host.py)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); "
          f"{args.steps}-step DDIM, {args.repeats} alternating rounds")
    rows = []
    for name, batch in loops:
        rows.append(unet_loop_timing(name, batch, args.steps, args.repeats))
        print(markdown_row(rows[-1]), flush=True)
    from diffusion_jax.eval.report import write_table

    write_table(args.out, "sampling", rows, "\n".join(HEADER + [markdown_row(r) for r in rows]))
    return rows


if __name__ == "__main__":
    main()
