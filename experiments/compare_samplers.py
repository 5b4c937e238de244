"""Sampler comparison on a trained model (trained first if the workdir is empty): the README's main job.

    python experiments/compare_samplers.py                              # preset "readme": < 10 min on 2 CPU cores
    python experiments/compare_samplers.py --preset paper               # the full grid: 1000 samples x 3 seeds
    python experiments/compare_samplers.py --num 500 --out results/c2   # any `diffusion-jax compare` flag overrides

This is `diffusion-jax compare` with a preset of flags; the work is done by `diffusion_jax.eval.compare` (NFE budgets,
common random numbers, balanced labels, held-out reference, bootstrap and paired intervals, table, plot, grids)
and `diffusion_jax.eval.solver_error` (error against a reference ODE solution, convergence orders, the exact-score
testbed). Results: OUT/results.md (the tables and verdicts), OUT/solver_error.md, OUT/quality_vs_nfe.png,
OUT/solver_error.png, OUT/overview.png, OUT/grids/<sampler>-nfe<N>.png and the CSVs.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.cli.main import main  # noqa: E402

PRESETS = {
    # Sized for the README (< 10 min with training on 2 CPU cores): the default digits model, ancestral DDPM, DDIM
    # and two higher-order multistep solvers at three budgets, 2 seeds x 500 samples per cell (n = 1000: FD intervals
    # about ±0.2, docs/results.md), unclipped (the solvers' own ODE, as the papers define them; diverged samples are
    # counted), then every ODE solver's error against a reference solution of the same ODE
    # from the same x_T at NFE 5-50 (128 samples), with the exact-score testbed beside it.
    "readme": ["--config", "configs/digits.py", "--workdir", "workdirs/digits", "--out", "results/compare",
               "--samplers", "ddpm,ddim,dpmpp_2m,unipc_bh2", "--nfe", "5,10,20", "--num", "500", "--seeds", "2",
               "--clip", "0", "--solver-error-nfe", "5,10,20,50", "--solver-error-num", "128"],
    # The comparison as a paper would run it (about an hour or more on 2 CPU cores for the digits model).
    "paper": ["--config", "configs/digits.py", "--workdir", "workdirs/digits", "--out", "results/compare_paper",
              "--samplers", "ddpm,ddim,euler,heun,plms,dpmpp_2m,dpmpp_3m,unipc_bh2,euler_ancestral,dpmpp_2m_sde",
              "--nfe", "5,10,20,50,100", "--num", "1000", "--seeds", "3", "--clip", "0",
              "--solver-error-nfe", "5,10,20,50,100", "--solver-error-num", "500"],
}


def run(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = "readme"
    if "--preset" in argv:
        i = argv.index("--preset")
        if i + 1 >= len(argv) or argv[i + 1] not in PRESETS:
            print(f"--preset must be one of {sorted(PRESETS)}", file=sys.stderr)
            return 2
        preset = argv[i + 1]
        del argv[i:i + 2]
    return main(["compare", *PRESETS[preset], *argv])   # later flags win (argparse keeps the last value)


if __name__ == "__main__":
    sys.exit(run())
