"""Sampler accuracy on the exact-score testbed, and the compiled sampling loop vs diffusers' Python loop.

    python benchmarks/samplers.py [--dims 64,3072] [--nfe 5,10,20,50,100] [--spacing karras] [--out results/samplers]

Part 1: a Gaussian mixture in R^d (d = 64 and 3072) with the exact denoiser, linear DDPM schedule (T = 1000).
Every deterministic solver starts from the same x_T at t = T-1 and is compared with the probability-flow ODE
solution computed to 1e-10 (diffrax Dopri8, float64). Error = RMS over samples and dimensions. Steps are
chosen so that the network-evaluation count (NFE) is as close as possible to each target; the table prints the
NFE actually used. The DDIM-100 row (trailing spacing, the DDIM loop itself) is the bar: which solvers reach its
error at 10 NFE or fewer?

Part 2: wall time of a 50-step DDIM loop on a small U-Net (ours: one jitted lax.scan; diffusers: UNet2DModel in
a Python loop over DDIMScheduler.step, torch.no_grad), same config and batch, in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax.samplers import ddim_sample, discrete_grid, make_denoiser  # noqa: E402
from diffusion_jax.samplers.registry import get_sampler  # noqa: E402
from diffusion_jax.schedules import make_schedule  # noqa: E402
from diffusion_jax.testbed import GaussianMixture, discrete_denoise_fn, reference_ode_solution  # noqa: E402

# name -> NFE as a function of steps K on a grid ending at sigma = 0
SOLVERS = {"euler": lambda k: k, "heun": lambda k: 2 * k - 1, "plms": lambda k: k + 1, "dpm_solver_2": lambda k: k,
           "dpm_solver_3": lambda k: k, "dpmpp_2m": lambda k: k, "dpmpp_3m": lambda k: k,
           "unipc_bh1": lambda k: k, "unipc_bh2": lambda k: k}
OPTIONS = {"unipc_bh1": {"order": 3}, "unipc_bh2": {"order": 3}}


def steps_for(name: str, nfe: int) -> int:
    nfe_of = SOLVERS[name]
    return min(range(1, nfe + 2), key=lambda k: (abs(nfe_of(k) - nfe), -k))


def accuracy_table(dim: int, nfes, spacing: str, n: int, seed: int = 0):
    schedule = make_schedule("linear", 1000)
    mix = GaussianMixture.random(jax.random.PRNGKey(seed), num_components=8, dim=dim)
    denoise_fn = discrete_denoise_fn(mix, schedule, "eps")
    x_T = jax.random.normal(jax.random.PRNGKey(seed + 1), (n, dim))
    t0 = time.perf_counter()
    ref = reference_ode_solution(mix, x_T, float(schedule.sigma(999)), alpha_from=float(schedule.alpha(999)))
    print(f"  d={dim}: reference PF-ODE solution for {n} samples in {time.perf_counter() - t0:.1f} s", flush=True)
    err = lambda x: float(np.sqrt(np.mean((np.asarray(x, np.float64) - ref) ** 2)))
    rows = {}
    ddim = jax.jit(lambda x: ddim_sample(denoise_fn, schedule, None, x.shape, steps=100, spacing="trailing",
                                         clip_denoised=None, x_T=x)[0])
    rows["ddim (trailing, 100 steps)"] = {100: (100, err(ddim(x_T)))}
    denoiser = make_denoiser(denoise_fn, "eps")
    for name in SOLVERS:
        rows[name] = {}
        for nfe in nfes:
            k = steps_for(name, nfe)
            grid = discrete_grid(schedule, k, spacing)
            fn = get_sampler(name, **OPTIONS.get(name, {}))
            x, info = jax.jit(lambda x: fn(denoiser, grid, x, None))(x_T)
            rows[name][nfe] = (int(info["nfe"]), err(x))
    return rows


def print_table(rows, nfes, dim, spacing) -> str:
    lines = [f"### d = {dim} (spacing {spacing}; RMS error vs the exact PF-ODE solution; NFE used in brackets)", "",
             "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for name, by_nfe in rows.items():
        cells = [f"{by_nfe[n][1]:.2e} ({by_nfe[n][0]})" if n in by_nfe else "" for n in nfes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    bar = rows["ddim (trailing, 100 steps)"][100][1]
    winners = [f"{name} (NFE {by[n][0]}: {by[n][1]:.2e})" for name, by in rows.items() if name in SOLVERS
               for n in nfes if by[n][0] <= 10 and by[n][1] <= bar]
    lines += ["", f"DDIM-100 error {bar:.2e}; reached at <= 10 NFE by: {', '.join(winners) or 'none'}", ""]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def unet_loop_timing(batch: int, steps: int, repeats: int):
    from diffusion_jax.bench import bench_torch_module  # torch side lives with the other torch code
    from diffusion_jax.models import UNetConfig
    from diffusion_jax.models.functional import make_apply_fn, split_params
    from diffusion_jax.models import UNet
    from flax import nnx

    cfg = UNetConfig(image_size=32, in_channels=3, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(16,), dropout=0.0, num_groups=8)
    graphdef, params = split_params(UNet(cfg, rngs=nnx.Rngs(0)))
    apply = make_apply_fn(graphdef)
    schedule = make_schedule("linear", 1000)
    shape = (batch, 32, 32, 3)
    run = jax.jit(lambda p, key: ddim_sample(lambda x, t: apply(p, x, t), schedule, key, shape, steps=steps)[0])
    t0 = time.perf_counter()
    jax.block_until_ready(run(params, jax.random.PRNGKey(0)))
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(params, jax.random.PRNGKey(r + 1)))
        times.append(time.perf_counter() - t0)
    ours = statistics.median(times)
    theirs = bench_torch_module(cfg, batch, steps, repeats)
    return compile_s, ours, theirs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="64,3072")
    p.add_argument("--nfe", default="5,10,20,50,100")
    p.add_argument("--spacing", default="karras")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="U-Net batch for the loop timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/samplers")
    args = p.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    texts = []
    for dim in [int(v) for v in args.dims.split(",")]:
        texts.append(print_table(accuracy_table(dim, nfes, args.spacing, args.samples), nfes, dim, args.spacing))
    compile_s, ours, theirs = unet_loop_timing(args.batch, 50, args.repeats)
    timing = (f"DDIM-50, small U-Net (32x32x3, batch {args.batch}): ours {ours:.2f} s (compile {compile_s:.1f} s), "
              + (f"diffusers {theirs:.2f} s, ratio diffusers / ours = {theirs / ours:.2f}x" if theirs else
                 "diffusers not installed"))
    print(timing)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "samplers.md"), "w") as f:
        f.write("\n".join(texts) + "\n" + timing + "\n")
    print(f"-> {os.path.join(args.out, 'samplers.md')}")


if __name__ == "__main__":
    main()
