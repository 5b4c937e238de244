"""The shape of DDIM's Table 1 (Song et al. 2021) at CPU scale: quality of DDIM with eta in {0, 0.2, 0.5, 1} and of
DDPM with the larger variance sigma-hat, at 10, 20, 50 and 100 steps, from one trained model, beside the paper's
CIFAR-10 FIDs.

    python experiments/reproduce_ddim_table.py [--workdir workdirs/digits] [--num 500] [--seeds 2] [--out R]

Trains configs/digits.py first if the workdir has no checkpoint. Timesteps use the paper's uniform spacing
("leading": tau_i = i T / S); x0 is not clipped (as in DDIM's code). Our numbers are Fréchet distances on the
digits classifier's features, not Inception FIDs on CIFAR-10: compare the shape (how quality falls with fewer steps
and more noise), not the values.
Writes OUT/ddim_table.md (both tables), plus everything `diffusion-jax compare` writes (plot, grids, CSV).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.eval import report  # noqa: E402
from diffusion_jax.eval.compare import CompareSpec, run_compare  # noqa: E402

STEPS = (10, 20, 50, 100)
ROWS = {"ddim:eta=0.0": "η = 0.0 (DDIM)", "ddim:eta=0.2": "η = 0.2", "ddim:eta=0.5": "η = 0.5",
        "ddim:eta=1.0": "η = 1.0", "ddpm:variance=fixed_large": "σ̂ (DDPM, larger variance)"}
# DDIM paper, Table 1, CIFAR-10 (32x32) FID at S = 10, 20, 50, 100 steps (transcribed from the paper).
PAPER_CIFAR10 = {"ddim:eta=0.0": (13.36, 6.84, 4.67, 4.16), "ddim:eta=0.2": (14.04, 7.11, 4.77, 4.25),
                 "ddim:eta=0.5": (16.66, 8.35, 5.25, 4.46), "ddim:eta=1.0": (41.07, 18.36, 8.01, 5.78),
                 "ddpm:variance=fixed_large": (367.43, 133.37, 32.72, 9.99)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="workdirs/digits")
    p.add_argument("--config", default="configs/digits.py", help="trained first if the workdir is empty")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="results/ddim_table")
    args = p.parse_args(argv)
    from diffusion_jax.config import load_experiment
    from diffusion_jax.train.loop import train_and_evaluate

    train_and_evaluate(load_experiment(args.config)[0], args.workdir)   # resumes; a finished run is reused
    spec = CompareSpec(samplers=tuple(ROWS), nfes=STEPS, num=args.num, seeds=args.seeds, spacing="leading",
                       clip_denoised=None)   # DDIM's code does not clip x0 (generalized_steps)
    res = run_compare(args.workdir, spec, args.out)
    by = {(r["sampler"], r["target_nfe"]): r for r in res["summary"]}
    ours = [[label] + [report.fmt(by[(v, s)]["fd_pooled"], by[(v, s)]["fd_half"]) for s in STEPS]
            for v, label in ROWS.items()]
    diff = {(r["sampler"], r["target_nfe"]): r for r in res["paired"]}
    cell = lambda r: f"{r['fd_diff']:+.3g} [{r['fd_lo']:+.3g}, {r['fd_hi']:+.3g}] {r['fd_verdict']}"
    paired = [[label] + [cell(diff[(v, s)]) for s in STEPS] for v, label in ROWS.items() if v != "ddim:eta=0.0"]
    paper = [[label] + [f"{x:.2f}" for x in PAPER_CIFAR10[v]] for v, label in ROWS.items()]
    header = ["sampler"] + [f"S = {s}" for s in STEPS]
    n = args.num * args.seeds
    floor = res["floor"]
    text = ["# DDIM Table 1, reproduced at CPU scale", "",
            f"## Ours: digits, Fréchet distance on the digits classifier's features ({n} samples pooled over "
            f"{args.seeds} seeds, balanced labels, held-out reference; 95% bootstrap interval; lower is better)", "",
            report.markdown_table(header, ours),
            f"Real vs real (the floor): {report.fmt(floor['fd_pooled'], floor['fd_half'])} ({floor['n_pooled']} "
            "training images against the same held-out reference).", "",
            "Paired with DDIM (η = 0) at the same S on the same samples (same x_T and labels), FD difference with its "
            "95% paired bootstrap interval and verdict; negative = better than DDIM:", "",
            report.markdown_table(header, paired),
            "## Paper: CIFAR-10, Inception FID (Song et al. 2021, Table 1)", "", report.markdown_table(header, paper)]
    path = os.path.join(args.out, "ddim_table.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))
    print(f"-> {path} (plot {res['plot']}, grids {res['grids']})")


if __name__ == "__main__":
    main()
