"""Sampler accuracy on the exact-score testbed, and the compiled sampling loop vs diffusers' Python loop.

    python benchmarks/samplers.py [--dims 64,3072] [--nfe 5,10,20,50,100] [--spacings karras,logsnr,quadratic,uniform]
                                  [--loops digits:1,digits:16,digits:100,small32:8,cifar10:4] [--out results/samplers]

Part 1: a Gaussian mixture in R^d (d = 64 and 3072) with the exact denoiser, linear DDPM schedule (T = 1000).
Every deterministic solver starts from the same x_T at t = T-1 and is compared with the probability-flow ODE
solution computed to 1e-10 (diffrax Dopri8, float64). Error = RMS over samples and dimensions. Steps are
chosen so that the network-evaluation count (NFE) is as close as possible to each target; the table prints the
NFE actually used. Each solver runs on every spacing in --spacings and each cell reports the best one (all cells
go to samplers.csv), since the best grid differs between solvers. The DDIM-100 row (trailing spacing, the DDIM
loop itself) is the bar: which solvers reach its error at 10 NFE or fewer?

Part 2: wall time and img/s of a 50-step DDIM loop on U-Nets (the digits model of configs/digits.py, a small
32x32x3 one, and the DDPM CIFAR-10 U-Net; ours: one jitted lax.scan; diffusers: UNet2DModel in a Python loop over
DDIMScheduler.step, torch.no_grad), same config and batch, in the same run, timed alternately (one loop of ours,
then one of diffusers', --repeats times; the ratio is the median over rounds, with its range), at several batch
sizes: compilation removes the per-step Python and dispatch overhead that dominates at small batches; at large
batches the convolutions and normalisations dominate. This part alone, with more options:
`python benchmarks/sampling_loop.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tqdm import tqdm  # noqa: E402

from sampling_loop import (HEADER, MODELS, markdown_row, parse_loops,  # noqa: E402
                                          unet_loop_timing)
from diffusion_jax.host import reuse_host_memory  # noqa: E402
from diffusion_jax.samplers import discrete_grid, make_denoiser, run_sampler  # noqa: E402
from diffusion_jax.samplers.registry import get_sampler  # noqa: E402
from diffusion_jax.process.discrete import make_schedule  # noqa: E402
from diffusion_jax.testbed import GaussianMixture, discrete_denoise_fn, reference_ode_solution  # noqa: E402

# row label -> (registry name, options, NFE as a function of steps K on a grid ending at sigma = 0)
SOLVERS = {
    "euler": ("euler", {}, lambda k: k), "heun": ("heun", {}, lambda k: 2 * k - 1),
    "plms": ("plms", {}, lambda k: k + 1), "dpm_solver_2": ("dpm_solver_2", {}, lambda k: k),
    "dpm_solver_3": ("dpm_solver_3", {}, lambda k: k), "dpmpp_2m": ("dpmpp_2m", {}, lambda k: k),
    "dpmpp_3m": ("dpmpp_3m", {}, lambda k: k),
    "unipc_bh1 (order 2)": ("unipc_bh1", {"order": 2}, lambda k: k),
    "unipc_bh2 (order 2)": ("unipc_bh2", {"order": 2}, lambda k: k),
    "unipc_bh2 (order 3)": ("unipc_bh2", {"order": 3}, lambda k: k),
}
BAR = "ddim (trailing, 100 steps)"


def steps_for(label: str, nfe: int) -> int:
    nfe_of = SOLVERS[label][2]
    return min(range(1, nfe + 2), key=lambda k: (abs(nfe_of(k) - nfe), -k))


def accuracy_table(dim: int, nfes, spacings, n: int, seed: int = 0):
    """rows[label][nfe] = (nfe used, error, spacing) for the spacing with the smallest error; also every cell."""
    schedule = make_schedule("linear", 1000)
    mix = GaussianMixture.random(jax.random.PRNGKey(seed), num_components=8, dim=dim)
    denoise_fn = discrete_denoise_fn(mix, schedule, "eps")
    x_T = jax.random.normal(jax.random.PRNGKey(seed + 1), (n, dim))
    t0 = time.perf_counter()
    ref = reference_ode_solution(mix, x_T, float(schedule.sigma(999)), alpha_from=float(schedule.alpha(999)))
    print(f"  d={dim}: reference PF-ODE solution for {n} samples in {time.perf_counter() - t0:.1f} s", flush=True)
    err = lambda x: float(np.sqrt(np.mean((np.asarray(x, np.float64) - ref) ** 2)))
    ddim = jax.jit(lambda x: run_sampler("ddim", denoise_fn, schedule, None, x.shape, steps=100, spacing="trailing",
                                         x_T=x)[0])
    rows, cells = {BAR: {100: (100, err(ddim(x_T)), "trailing")}}, []
    denoiser = make_denoiser(denoise_fn, "eps")
    for label, (name, options, _) in tqdm(SOLVERS.items(), desc=f"d={dim}", leave=False):
        rows[label] = {}
        fn = get_sampler(name, **options)
        for nfe in nfes:
            k = steps_for(label, nfe)
            for spacing in spacings:
                try:
                    grid = discrete_grid(schedule, k, spacing)
                except ValueError:   # e.g. quadratic spacing repeats timesteps beyond ~40 steps
                    continue
                x, info = jax.jit(lambda x: fn(denoiser, grid, x, None))(x_T)
                cell = (int(info["nfe"]), err(x), spacing)
                cells.append((dim, label, nfe) + cell)
                if nfe not in rows[label] or cell[1] < rows[label][nfe][1]:
                    rows[label][nfe] = cell
    return rows, cells


def print_table(rows, nfes, dim, spacings) -> str:
    lines = [f"### d = {dim}: RMS error vs the exact PF-ODE solution, best of spacings {', '.join(spacings)} "
             "(NFE used, spacing)", "",
             "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for name, by_nfe in rows.items():
        cells = [f"{by_nfe[n][1]:.2e} ({by_nfe[n][0]}, {by_nfe[n][2]})" if n in by_nfe else "" for n in nfes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    bar = rows[BAR][100][1]
    winners = [f"{name} (NFE {by[n][0]}, {by[n][2]}: {by[n][1]:.2e})" for name, by in rows.items() if name in SOLVERS
               for n in nfes if by[n][0] <= 10 and by[n][1] <= bar]
    lines += ["", f"DDIM-100 error {bar:.2e}; reached at <= 10 NFE by: {', '.join(winners) or 'none'}", ""]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None):
    reuse_host_memory()   # before JAX's CPU backend and torch start (diffusion_jax/host.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="64,3072")
    p.add_argument("--nfe", default="5,10,20,50,100")
    p.add_argument("--spacings", default="karras,logsnr,quadratic,uniform",
                   help="each cell reports the spacing with the smallest error")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--loops", default="digits:1,digits:16,digits:100,small32:8,cifar10:4",
                   help="U-Net DDIM-50 timings as MODEL:BATCH (models: %s); empty to skip" % ", ".join(MODELS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/samplers")
    args = p.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    spacings = args.spacings.split(",")
    loops = parse_loops(args.loops)   # a bad MODEL:BATCH fails before the accuracy tables run
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    texts, cells = [], []
    for dim in [int(v) for v in args.dims.split(",") if v]:   # --dims '' times the loops only
        rows, dim_cells = accuracy_table(dim, nfes, spacings, args.samples)
        texts.append(print_table(rows, nfes, dim, spacings))
        cells += dim_cells
    lines = list(HEADER)
    for name, batch in loops:
        lines.append(markdown_row(unet_loop_timing(name, batch, 50, args.repeats)))
        print(lines[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "samplers.md"), "w") as f:
        f.write("\n".join(texts) + "\n### DDIM-50 loop wall time\n\n" + "\n".join(lines) + "\n")
    with open(os.path.join(args.out, "samplers.csv"), "w") as f:
        f.write("dim,solver,target_nfe,nfe,error,spacing\n")
        f.writelines(",".join(str(v) for v in c) + "\n" for c in cells)
    print(f"-> {os.path.join(args.out, 'samplers.md')}, samplers.csv")


if __name__ == "__main__":
    main()
