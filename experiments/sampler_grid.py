"""Side-by-side sample grids of DDPM and DDIM at several step counts, from one trained workdir, same seed.

    python experiments/sampler_grid.py --workdir workdirs/digits --steps 10,20,50,100 --num 20 --out results/grids

Writes one PNG per (sampler, steps) and `index.md` listing them with their NFE; the initial noise x_T is the
same for every grid (samplers draw x_T from fold_in(key, 0)), so rows differ only by the sampler.
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffusion_jax import viz  # noqa: E402
from diffusion_jax.sampling import SamplerSpec, class_labels, make_sample_fn  # noqa: E402
from diffusion_jax.schedules import make_schedule  # noqa: E402
from diffusion_jax.train.checkpoint import load_trained  # noqa: E402

RUNS = {"ddim": dict(sampler="ddim", options=(("eta", 0.0),)),
        "ddpm_small": dict(sampler="ddpm", options=(("variance", "fixed_small"),)),
        "ddpm_large": dict(sampler="ddpm", options=(("variance", "fixed_large"),))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", default="10,20,50,100")
    p.add_argument("--num", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/sampler_grid")
    args = p.parse_args(argv)
    exp, graphdef, params, step = load_trained(args.workdir)
    schedule = make_schedule(**dataclasses.asdict(exp.schedule))
    shape = (args.num, exp.model.image_size, exp.model.image_size, exp.model.in_channels)
    labels = class_labels(args.num, exp.model.num_classes)
    os.makedirs(args.out, exist_ok=True)
    rows = ["| sampler | steps | NFE | grid |", "| --- | --- | --- | --- |"]
    jobs = [(name, int(s)) for name in RUNS for s in args.steps.split(",")]
    for name, steps in tqdm(jobs, desc="grids"):
        spec = SamplerSpec(steps=steps, **RUNS[name])
        fn = make_sample_fn(graphdef, schedule, spec, shape, prediction=exp.loss.prediction,
                            learn_sigma=exp.model.learn_sigma, num_classes=exp.model.num_classes)
        images, nfe = fn(params, jax.random.PRNGKey(args.seed), labels)
        path = viz.save_grid(np.asarray(images), os.path.join(args.out, f"{name}_{steps:04d}.png"),
                             nrow=exp.model.num_classes or None)
        rows.append(f"| {name} | {steps} | {nfe} | ![]({os.path.basename(path)}) |")
    with open(os.path.join(args.out, "index.md"), "w") as f:
        f.write(f"# Samples from {args.workdir} (checkpoint step {step}, seed {args.seed})\n\n" + "\n".join(rows) + "\n")
    print(f"{len(jobs)} grids -> {args.out}/index.md")


if __name__ == "__main__":
    main()
