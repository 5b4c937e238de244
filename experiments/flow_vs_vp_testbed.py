"""Rectified flow against VP diffusion on the exact-score testbed: the same 10-component Gaussian mixture in R^64, the
exact velocity (flow, `process.flow.RectifiedFlow`) and the exact noise prediction (DDPM's linear betas), the same
standard normal draws z, solver error against each process's exact probability-flow ODE endpoint, vs NFE.

    python experiments/flow_vs_vp_testbed.py [--num 1000] [--out results/flow_vs_vp]

Rows: Euler on the rectified-flow ODE (flow_euler, uniform t from sigma = 1) and DDIM on the VP ODE (ddim, "trailing"
timesteps from t = 999), the question the issue asks; Heun on the flow (flow_heun, on uniform t and on log-SNR levels)
and DPM-Solver++(2M) on VP (logsnr levels) as second-order context. Both ODEs are the same ODE in y = x / alpha,
s = sigma / alpha (the PF-ODE does not depend on the process, only on s), and flow Euler and DDIM are the same update
(exact for a constant x0-hat): what differs is where the levels fall in s, from where (s_max = 4096 for the flow's
first level alpha = 2^-12, 157 for VP), so this measures the time parameterisations. Error: per sample, RMS over the
64 coordinates of x_0 minus the exact endpoint from the same x_T (diffrax, rtol 1e-8); paired: the mean log ratio
VP / flow over the same z with a 95% bootstrap interval. Quality: MMD^2 to the mixture (Gaussian kernel, bandwidth 1)
with its standard error, next to the floor (fresh data vs the mixture). Writes OUT/flow_vs_vp.md and .csv.
"""
import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax.eval import report  # noqa: E402
from diffusion_jax.process.discrete import make_schedule  # noqa: E402
from diffusion_jax.process.flow import RectifiedFlow  # noqa: E402
from diffusion_jax.samplers import run_sampler  # noqa: E402
from diffusion_jax.samplers.grid import continuous_grid, discrete_grid  # noqa: E402
from diffusion_jax.testbed import (GaussianMixture, discrete_denoise_fn, mixture_mmd2, process_denoise_fn,  # noqa
                                   reference_ode_solution)

NFES = (5, 10, 20, 50)
ROWS = {  # name -> (process, sampler, spacing, prediction)
    "flow_euler (RF)": ("flow", "flow_euler", "uniform", "flow"),
    "ddim (VP)": ("vp", "ddim", "trailing", "eps"),
    "flow_heun (RF)": ("flow", "flow_heun", "uniform", "flow"),
    "dpmpp_2m (VP)": ("vp", "dpmpp_2m", "logsnr", "eps"),
    "flow_heun (RF, logsnr)": ("flow", "flow_heun", "logsnr", "flow"),
}


def _steps(sampler: str, nfe: int) -> int:
    return (nfe + 1) // 2 if sampler == "flow_heun" else nfe      # Heun: 2K - 1 evaluations


def _bootstrap_mean(v: np.ndarray, key: int = 0, n: int = 2000) -> tuple[float, float, float]:
    rng = np.random.default_rng(key)
    means = v[rng.integers(0, len(v), (n, len(v)))].mean(axis=1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--out", default="results/flow_vs_vp")
    args = p.parse_args(argv)
    start = time.time()
    mix = GaussianMixture.random(jax.random.key(0), 10, 64)
    z = np.asarray(jax.random.normal(jax.random.key(1), (args.num, 64)))
    procs = {"flow": RectifiedFlow(), "vp": make_schedule("linear", 1000)}
    nets = {"flow": process_denoise_fn(mix, procs["flow"], "flow"), "vp": discrete_denoise_fn(mix, procs["vp"], "eps")}
    refs = {}
    for name, proc in procs.items():   # the exact endpoint from each process's first level, x_T = sigma_0 z
        grid = continuous_grid(proc, 2) if name == "flow" else discrete_grid(proc, 2, "trailing")
        a0, s0 = float(grid.alpha[0]), float(grid.sigma[0])
        refs[name] = (s0, reference_ode_solution(mix, s0 * z, s0, alpha_from=a0, rtol=1e-8, atol=1e-8))
    results, errors = [], {}
    for label, (proc, sampler, spacing, prediction) in ROWS.items():
        s0, ref = refs[proc]
        for nfe in NFES:
            x, info = run_sampler(sampler, nets[proc], procs[proc], jax.random.key(2), z.shape,
                                  steps=_steps(sampler, nfe), prediction=prediction, spacing=spacing, x_T=s0 * z)
            x = np.asarray(x, np.float64)
            err = np.sqrt(np.mean((x - ref) ** 2, axis=1))
            errors[label, nfe] = err
            mmd, se = mixture_mmd2(mix, x, 1.0, return_stderr=True)
            results.append({"row": label, "nfe": int(info["nfe"]), "target_nfe": nfe, "rms_error": float(err.mean()),
                            "mmd2": float(mmd), "mmd2_se": float(se)})
    floor, floor_se = mixture_mmd2(mix, np.asarray(mix.sample(jax.random.key(3), args.num)), 1.0, return_stderr=True)
    paired = []
    for a, b in (("ddim (VP)", "flow_euler (RF)"), ("dpmpp_2m (VP)", "flow_heun (RF)"),
                 ("dpmpp_2m (VP)", "flow_heun (RF, logsnr)")):
        for nfe in NFES:
            mean, lo, hi = _bootstrap_mean(np.log(errors[a, nfe] / errors[b, nfe]))
            verdict = "flow better" if lo > 0 else "VP better" if hi < 0 else "no difference"
            paired.append([f"{a} / {b}", str(nfe), f"{np.exp(mean):.3g} [{np.exp(lo):.3g}, {np.exp(hi):.3g}]", verdict])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "flow_vs_vp.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    by = {(r["row"], r["target_nfe"]): r for r in results}
    table = [[label] + [f"{by[label, n]['rms_error']:.3g}" for n in NFES] for label in ROWS]
    quality = [[label] + [f"{by[label, n]['mmd2']:.2e} ± {by[label, n]['mmd2_se']:.1e}" for n in NFES]
               for label in ROWS]
    header = ["row"] + [f"NFE {n}" for n in NFES]
    text = ["# Rectified flow vs VP on the exact-score testbed", "",
            f"{args.num} paired draws z; 10-component mixture in R^64; `python experiments/flow_vs_vp_testbed.py "
            f"--num {args.num}` ({time.time() - start:.0f} s on this machine).", "",
            "## Solver error (mean over samples of the RMS distance to the exact ODE endpoint)", "",
            report.markdown_table(header, table),
            "## Paired: error ratio VP / flow over the same z (geometric mean, 95% bootstrap interval)", "",
            report.markdown_table(["pair", "NFE", "ratio", "verdict"], paired),
            f"## MMD^2 to the mixture (bandwidth 1); floor (fresh data): {floor:.2e} ± {floor_se:.1e}", "",
            report.markdown_table(header, quality)]
    with open(os.path.join(args.out, "flow_vs_vp.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
