"""Flow matching against diffusion on the digits default, at matched parameters and training compute, and what reflow
buys at 1-4 NFE.

    python experiments/flow_digits.py [--root workdirs/flow_digits] [--num 1000] [--out results/flow_digits]

Models (configs/digits.py: the 8x8 digits, class-conditional, batch 64, AdamW 2e-3 with cosine decay, EMA 0.995):
  eps-unet   the DDPM objective: eps-prediction on the cosine schedule, 2,500 steps
  v-unet     the project default (v-prediction, cosine), 2,500 steps: the strongest diffusion baseline here
  flow-unet  rectified flow (schedule.kind=flow, velocity prediction, uniform t), the same U-Net, 2,500 steps
  flow-dit   rectified flow on DiT (hidden 80, depth 5, 4 heads, 2x2 patches): parameters within 5% of the U-Net's;
             trained for as many steps as give the U-Net's training FLOPs (XLA's forward count per image x steps)
  reflow     2-rectified flow (Liu et al. 2023): flow-unet's ODE pairs (flow_heun, 25 steps, --pairs of them),
             fine-tuned from flow-unet's EMA weights (train.init_from) for --reflow-steps steps
  eps-unet-clip  eps-unet's network sampled as DDPM / DDIM do, x0-hat clipped to [-1, 1] (no other model is clipped)
  flow-ft    reflow's control: the same fine-tuning of flow-unet (init_from, --reflow-steps steps) on the data with
             independent noise, so reflow - flow-ft is the coupling's effect at equal training
Every model is sampled from the same --num standard-normal x_T with balanced labels (i mod 10), without guidance and
without clipping; "euler" is each model's first-order solver (DDIM on trailing timesteps for the diffusion models,
flow Euler for the flows: on the rectified flow the same update), both on "trailing" levels (K equal steps in t down
to the clean end), "dpmpp_2m" DPM-Solver++(2M) on log-SNR
levels; the reference of each model is its own ODE solved by adaptive Dopri5 (rtol = atol = 1e-5).
Per cell: FD on the digits classifier's features against the held-out split (balanced reference statistics) with a
stratified bootstrap interval, class agreement (Wilson), solver error (per-sample RMS to the model's reference,
t-interval). Paired comparisons on the same x_T: FD difference (paired bootstrap) and solver-error difference
(paired t). Straightness (eval/straightness.py) per model on --num // 2 of the x_T. Floor: --num real training images.
Writes OUT/flow_digits.md, cells.csv, paired.csv, models.csv, fd_vs_nfe.png, error_vs_nfe.png, grids/*.png.
"""
import argparse
import json
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

BASE = "configs/digits.py"
FLOW = ["schedule.kind=flow", "loss.prediction=flow", "sample.spacing=uniform"]
DIT = ["model.name=dit", "model.hidden_size=80", "model.depth=5", "model.num_heads=4", "model.patch_size=2"]
EULER_NFES, DPM_NFES = (1, 2, 4, 8, 16, 32), (4, 8, 16, 32)
ALIAS = {"eps-unet-clip": ("eps-unet", 1.0)}   # a model evaluated from another's workdir: (workdir, clip)
PAIRED = [("eps-unet-clip", "eps-unet"), ("flow-unet", "eps-unet-clip"), ("flow-unet", "v-unet"),
          ("flow-dit", "flow-unet"), ("reflow", "flow-unet"), ("reflow", "flow-ft")]


def overrides_of(name: str, args, dit_steps: int | None = None) -> list[str]:
    steps = [f"train.steps={args.train_steps}"]
    return {"eps-unet": ["loss.prediction=eps"] + steps, "v-unet": steps, "flow-unet": FLOW + steps,
            "flow-dit": FLOW + DIT + [f"train.steps={dit_steps}"],
            "reflow": FLOW + [f"train.steps={args.reflow_steps}", "data.name=pairs",
                              f"data.data_dir={os.path.join(args.root, 'pairs.npz')}",
                              f"train.init_from={os.path.join(args.root, 'flow-unet')}"],
            "flow-ft": FLOW + [f"train.steps={args.reflow_steps}",
                               f"train.init_from={os.path.join(args.root, 'flow-unet')}"]}[name]


def forward_flops(exp) -> tuple[int, float]:
    """(parameters, forward FLOPs per image by XLA's cost analysis) of a config's network, nothing allocated."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models.functional import make_apply_fn
    from diffusion_jax.train.state import make_init_fn, make_optimizer, model_graphdef

    tx, _ = make_optimizer(exp.optim, exp.train.steps, exp.model)
    params = jax.eval_shape(make_init_fn(exp.model, tx, jax.random.PRNGKey(0), None)).params
    apply, b, m = make_apply_fn(model_graphdef(exp.model, None)), 64, exp.model
    x = jax.ShapeDtypeStruct((b, m.image_size, m.image_size, m.in_channels), jnp.float32)
    cost = jax.jit(lambda p, x: apply(p, x, jnp.zeros((b,)), y=jnp.zeros((b,), jnp.int32))).lower(params, x)
    cost = cost.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)), float(cost["flops"]) / b


def train(name: str, overrides: list[str], args) -> dict:
    """Train (or resume / reuse) one model; its row of models.csv (wall time of the run that trained it)."""
    from diffusion_jax.config import load_experiment
    from diffusion_jax.train.loop import train_and_evaluate

    workdir = os.path.join(args.root, ALIAS.get(name, (name,))[0])
    timing = os.path.join(workdir, "wall_time.json")
    exp = load_experiment(BASE, overrides)[0]
    if not os.path.isfile(timing):
        t0 = time.perf_counter()
        train_and_evaluate(exp, workdir, progress=not args.no_progress)
        with open(timing, "w") as f:
            json.dump({"seconds": time.perf_counter() - t0}, f)
    params, flops = forward_flops(exp)
    seconds = json.load(open(timing))["seconds"]
    return {"model": name, "params": params, "fwd_mflops": flops / 1e6, "steps": exp.train.steps,
            "train_pflops": 3 * flops * exp.train.steps * exp.train.batch_size / 1e15, "train_s": seconds}


class Model:
    """One trained run, sampled in chunks from given x_T (the same for every model)."""

    def __init__(self, workdir: str, noise, labels, batch: int, clip: float | None = None):
        from diffusion_jax.config import build_schedule
        from diffusion_jax.train.checkpoint import load_trained

        self.exp, self.graphdef, self.params, self.step = load_trained(workdir)
        self.schedule = build_schedule(self.exp.schedule, self.params)
        self.noise, self.labels, self.batch, self.clip = noise, labels, batch, clip

    def first_order(self) -> tuple[str, str]:
        return ("ddim", "trailing") if self.schedule.discrete else ("flow_euler", "trailing")

    def run(self, sampler: str, steps: int, spacing: str, options=()) -> tuple[np.ndarray, int]:
        from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn, sample_from

        spec = SamplerSpec(sampler, steps=steps, spacing=spacing, clip_denoised=self.clip, options=tuple(options))
        shape = (self.batch,) + self.noise.shape[1:]
        fn = make_sample_fn(self.graphdef, self.schedule, spec, shape, prediction=self.exp.loss.prediction,
                            num_classes=self.exp.model.num_classes)
        return sample_from(fn, self.params, self.noise, self.labels, batch=self.batch)

    def reference(self) -> tuple[np.ndarray, int]:
        steps = self.schedule.num_timesteps if self.schedule.discrete else 1000
        return self.run("adaptive", steps, "linspace" if self.schedule.discrete else "uniform",
                        (("atol", 1e-5), ("rtol", 1e-5), ("solver", "dopri5")))


def evaluate(name: str, model: Model, scorer, args) -> tuple[list[dict], dict]:
    """Rows of cells.csv for one model, and {(family, nfe): (features, per-sample error)} for the paired tests."""
    from tqdm.auto import tqdm

    from diffusion_jax import viz
    from diffusion_jax.eval.metrics.paired import fd_interval, mean_interval
    from diffusion_jax.eval.report import wilson
    from diffusion_jax.eval.solver_error import per_sample_rms

    ref, ref_nfe = model.reference()
    mu, sigma = scorer.real_stats
    first, spacing = model.first_order()
    todo = [("euler", first, spacing, n) for n in EULER_NFES] + [("dpmpp_2m", "dpmpp_2m", "logsnr", n)
                                                                  for n in DPM_NFES]
    rows, kept = [], {}
    for family, sampler, sp, nfe in tqdm(todo + [("reference", None, None, ref_nfe)], desc=name,
                                         disable=args.no_progress):
        x, used = (ref, ref_nfe) if sampler is None else model.run(sampler, nfe, sp)
        feats, probs = scorer.features(np.clip(x, -1.0, 1.0))
        fd = fd_interval(feats, mu, sigma, model.labels, seed=0)
        agree = int(np.sum(probs.argmax(1) == model.labels))
        err = per_sample_rms(x, ref)
        e = mean_interval(err) if sampler is not None else {"mean": 0.0, "lo": 0.0, "hi": 0.0}
        lo, hi = wilson(agree, len(x))
        rows.append({"model": name, "family": family, "sampler": sampler or "adaptive dopri5", "nfe": used,
                     "fd": fd["fd"], "fd_lo": fd["lo"], "fd_hi": fd["hi"], "agree": agree / len(x),
                     "agree_lo": lo, "agree_hi": hi, "err": e["mean"], "err_lo": e["lo"], "err_hi": e["hi"],
                     "diverged": float(np.mean(np.abs(x).reshape(len(x), -1).max(1) > 1.5))})
        kept[family, nfe] = (feats, err)
        if family == "euler" and nfe <= 4 or sampler is None:
            viz.save_grid(np.clip(x[:50], -1, 1), os.path.join(args.out, "grids", f"{name}_{family}_{nfe}.png"),
                          nrow=10)
    return rows, kept


def paired_rows(kept: dict, scorer, labels) -> list[dict]:
    from diffusion_jax.eval.metrics.paired import paired_fd_difference, paired_mean_difference, verdict_text

    mu, sigma = scorer.real_stats
    rows = []
    for a, b in PAIRED:
        if a not in kept or b not in kept:
            continue
        for (family, nfe) in sorted(kept[a]):
            if family == "reference" or (family, nfe) not in kept[b]:
                continue
            (fa, ea), (fb, eb) = kept[a][family, nfe], kept[b][family, nfe]
            fd = paired_fd_difference(fa, fb, mu, sigma, labels, seed=0)
            er = paired_mean_difference(ea, eb)
            rows.append({"a": a, "b": b, "family": family, "nfe": nfe, "fd_diff": fd["diff"], "fd_lo": fd["lo"],
                         "fd_hi": fd["hi"], "fd_verdict": verdict_text(fd, a, b),
                         "err_diff": er["diff"], "err_lo": er["lo"], "err_hi": er["hi"],
                         "err_verdict": verdict_text(er, a, b)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="workdirs/flow_digits")
    p.add_argument("--out", default="results/flow_digits")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--batch", type=int, default=500, help="samples per compiled call")
    p.add_argument("--train-steps", type=int, default=2500, help="the U-Nets' steps (the default's)")
    p.add_argument("--pairs", type=int, default=10000, help="reflow pairs drawn from flow-unet")
    p.add_argument("--reflow-steps", type=int, default=2500)
    p.add_argument("--models", default="eps-unet,eps-unet-clip,v-unet,flow-unet,flow-dit,reflow,flow-ft")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from diffusion_jax.host import reuse_host_memory

    reuse_host_memory()
    import jax

    from diffusion_jax.config import load_experiment
    from diffusion_jax.eval.evaluate import Scorer, balanced_labels
    from diffusion_jax.eval.metrics.paired import mean_interval
    from diffusion_jax.eval.straightness import model_straightness
    from diffusion_jax.inference.sampling import SamplerSpec
    from diffusion_jax.train.reflow import draw_pairs

    names = args.models.split(",")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    _, unet_flops = forward_flops(load_experiment(BASE)[0])
    _, dit_flops = forward_flops(load_experiment(BASE, FLOW + DIT)[0])
    dit_steps = int(round(args.train_steps * unet_flops / dit_flops))
    models, pair_s = [], None
    for name in names:
        if name == "reflow":
            pairs = os.path.join(args.root, "pairs.npz")
            if not os.path.isfile(pairs):
                t0 = time.perf_counter()
                draw_pairs(os.path.join(args.root, "flow-unet"), pairs, num=args.pairs, progress=not args.no_progress,
                           spec=SamplerSpec("flow_heun", steps=25, spacing="uniform", clip_denoised=None))
                with open(pairs + ".seconds.json", "w") as f:
                    json.dump({"seconds": time.perf_counter() - t0}, f)
            if os.path.isfile(pairs + ".seconds.json"):
                pair_s = json.load(open(pairs + ".seconds.json"))["seconds"]
        models.append(train(name, overrides_of(ALIAS.get(name, (name,))[0], args, dit_steps), args) | {"model": name})
    scorer = Scorer.for_experiment(load_experiment(BASE)[0], progress=not args.no_progress)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(2026), (args.num, 8, 8, 1)))
    labels = balanced_labels(args.num, 10)
    cells, kept = [], {}
    for row in models:
        workdir, clip = ALIAS.get(row["model"], (row["model"], None))
        workdir = os.path.join(args.root, workdir)
        cache = os.path.join(workdir, f"evaluation_{args.num}{'_clip' if clip else ''}.pkl")   # reruns: new models only
        if os.path.isfile(cache):
            with open(cache, "rb") as f:
                rows, kept[row["model"]] = pickle.load(f)
        else:
            model = Model(workdir, noise, labels, min(args.batch, args.num), clip)
            rows, kept[row["model"]] = evaluate(row["model"], model, scorer, args)
            half = args.num // 2
            kept[row["model"]]["straightness"] = model_straightness(model.exp, model.graphdef, model.params,
                                                                    noise[:half], labels[:half], steps=64)
            with open(cache, "wb") as f:
                pickle.dump((rows, kept[row["model"]]), f)
        cells += rows
        s = kept[row["model"]]["straightness"]
        si = mean_interval(s)
        row.update(straightness=si["mean"], straightness_lo=si["lo"], straightness_hi=si["hi"])
    paired = paired_rows({k: {f: v for f, v in d.items() if f != "straightness"} for k, d in kept.items()},
                         scorer, labels)
    straight = straightness_pairs(kept)
    floor = scorer.real_floor(args.num)
    write(args, models, cells, paired, straight, floor, dit_steps, pair_s, time.perf_counter() - t_start)
    return 0


def straightness_pairs(kept: dict) -> list[dict]:
    from diffusion_jax.eval.metrics.paired import paired_mean_difference, verdict_text

    rows = []
    for a, b in PAIRED:
        if a in kept and b in kept:
            d = paired_mean_difference(kept[a]["straightness"], kept[b]["straightness"])
            rows.append({"a": a, "b": b, "diff": d["diff"], "lo": d["lo"], "hi": d["hi"],
                         "verdict": verdict_text(d, a, b)})
    return rows


def _ci(v, lo, hi, d=2) -> str:
    return f"{v:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"


def _pivots(models, cells) -> list[str]:
    """Model x NFE tables of FD, class agreement and solver error, one per solver family."""
    from diffusion_jax.eval.report import markdown_table

    out = []
    for family in ("euler", "dpmpp_2m"):
        nfes = EULER_NFES if family == "euler" else DPM_NFES
        by = {(c["model"], c["nfe"]): c for c in cells if c["family"] == family}
        for title, show in (("FD (95% CI)", lambda c: _ci(c["fd"], c["fd_lo"], c["fd_hi"])),
                            ("class agreement", lambda c: f"{c['agree']:.3f}"),
                            ("RMS to own ODE (95% CI)", lambda c: _ci(c["err"], c["err_lo"], c["err_hi"], 3)),
                            ("diverged", lambda c: f"{c['diverged']:.3f}")):
            rows = [[m["model"]] + [show(by[m["model"], n]) if (m["model"], n) in by else "-" for n in nfes]
                    for m in models]
            out += [f"### {family}: {title}", "", markdown_table(["model"] + [f"NFE {n}" for n in nfes], rows), ""]
    return out


def write(args, models, cells, paired, straight, floor, dit_steps, pair_s, seconds) -> None:
    """OUT/flow_digits.md, the CSVs and the two plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion_jax.eval.report import markdown_table, write_csv

    for rows, name in ((cells, "cells"), (paired, "paired"), (models, "models"), (straight, "straightness")):
        write_csv(rows, os.path.join(args.out, f"{name}.csv"))
    lines = [f"# Flow matching vs diffusion on the digits ({args.num} samples per cell)", "",
             f"`python experiments/flow_digits.py --num {args.num}`: {seconds / 60:.0f} min on this machine "
             f"(training included when the workdirs were new). flow-dit trains {dit_steps} steps (matched training "
             f"FLOPs); reflow's {args.pairs} pairs took {'-' if pair_s is None else f'{pair_s:.0f} s'}.", "",
             "## Models", "",
             markdown_table(["model", "params", "fwd MFLOPs / image", "steps", "train PFLOPs (3 x fwd)", "train s",
                             "straightness S (95% CI)"],
                            [[m["model"], f"{m['params']:,}", f"{m['fwd_mflops']:.2f}", str(m["steps"]),
                              f"{m['train_pflops']:.3f}", f"{m['train_s']:.0f}",
                              _ci(m["straightness"], m["straightness_lo"], m["straightness_hi"], 4)]
                             for m in models]), "",
             f"Floor (real vs real, {floor['num']} training images vs the held-out reference): FD {floor['fd']:.2f}.",
             "", *_pivots(models, cells),
             "", "## Quality and solver error per cell", "",
             markdown_table(["model", "solver", "NFE", "FD (95% CI)", "class agreement", "RMS to own ODE",
                             "diverged"],
                            [[c["model"], c["sampler"], str(c["nfe"]), _ci(c["fd"], c["fd_lo"], c["fd_hi"]),
                              _ci(c["agree"], c["agree_lo"], c["agree_hi"], 3),
                              _ci(c["err"], c["err_lo"], c["err_hi"], 4), f"{c['diverged']:.3f}"] for c in cells]),
             "", "## Paired comparisons (same x_T and labels)", "",
             markdown_table(["a vs b", "solver", "NFE", "FD(a) - FD(b)", "RMS error(a) - error(b)"],
                            [[f"{r['a']} vs {r['b']}", r["family"], str(r["nfe"]), r["fd_verdict"],
                              r["err_verdict"]] for r in paired]),
             "", "## Straightness, paired", "", *[f"- {r['verdict']}" for r in straight], ""]
    with open(os.path.join(args.out, "flow_digits.md"), "w") as f:
        f.write("\n".join(lines))
    for metric, label, fname in (("fd", "FD (classifier features)", "fd_vs_nfe.png"),
                                 ("err", "RMS distance to the model's own ODE solution", "error_vs_nfe.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, family in zip(axes, ("euler", "dpmpp_2m")):
            for m in models:
                rows = [c for c in cells if c["model"] == m["model"] and c["family"] == family]
                x = [c["nfe"] for c in rows]
                ax.errorbar(x, [c[metric] for c in rows], yerr=[[c[metric] - c[f"{metric}_lo"] for c in rows],
                            [c[f"{metric}_hi"] - c[metric] for c in rows]], marker="o", capsize=3, label=m["model"])
            if metric == "fd":
                ax.axhline(floor["fd"], color="k", ls=":", label="real vs real")
            ax.set(xscale="log", yscale="log", xlabel="NFE", title=family, ylabel=label)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, fname), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
