"""Few-step generation on the digits default (or Fashion-MNIST): the teacher's solvers at 1-8 and 50 NFE against
progressive distillation (1-16 steps), consistency distillation and consistency training (1 and 2 steps), and guidance
distillation (a student taking the guidance weight w as input, then progressive rounds of it) against the teacher's
two-branch classifier-free guidance at w = 2, 3, on the same x_T.

    python experiments/distill.py [--data digits] [--root workdirs/distill_DATA] [--num 1000] \
        [--out results/distill_DATA]
    python experiments/distill.py --data fashion_mnist --models teacher,pd,cd,ct --cd-steps 1000 --ct-steps 2000

Teachers (--data): digits is configs/digits.py (the 8x8 digits, class-conditional, v-prediction on the cosine schedule,
2,500 steps), fashion_mnist is configs/fashion_mnist.py:cpu-v (16x16, a 32-channel U-Net, v-prediction on the cosine
schedule, 2,000 steps). The students' recipes are configs/distill.py's; --models picks families of them:
  teacher   the default run (or --teacher WORKDIR of one)
  pd-N      progressive distillation (Salimans & Ho 2022), rounds 32 -> 16 -> 8 -> 4 -> 2 -> 1 teacher DDIM steps on
            trailing levels, --pd-steps updates per round (AdamW 5e-4, cosine), each from the previous round's EMA
  cd        consistency distillation from the teacher (Song et al. 2023): 32 trailing scales, Heun as the teacher's
            one-step solver, iCT's pseudo-Huber metric, --cd-steps updates from the teacher's weights
  ct        improved consistency training (Song & Dhariwal 2023) from scratch on EDM's levels, --ct-steps updates
  guided    guidance distillation (Meng et al. 2023, stage one): the teacher's uncond + w (cond - uncond) learned by a
            student with w as input (w ~ U[1, 4], all 1000 levels), --guided-steps updates from the teacher's weights
  guided-pd-N  stage two: progressive rounds 32 -> 16 -> 8 -> 4 steps of the guided student, w given to both
  guided-cd consistency distillation of a student taking w (LCM, Luo et al. 2023): the teacher's one Heun step guided
            at the student's w ~ U[1, 4] (two branches), --cd-steps updates from the teacher's weights
Every cell samples the same --num standard-normal x_T (EDM's scaled by sigma_max) with balanced labels (i mod 10),
no clipping; guidance only in the cells marked w (two branches for the teacher, an input for the guided students).
Per cell: FD on the data's classifier's features against the held-out split (balanced reference statistics, stratified
bootstrap interval), KID, class agreement (Wilson) and the sampling wall time of all --num samples after compilation.
Paired FD differences (same x_T, paired bootstrap) answer the questions in PAIRED. Floor: --num real training images.
Writes OUT/distill_DATA.md, cells.csv, paired.csv, models.csv, fd_vs_nfe.png, guided_fd_vs_nfe.png and grids/*.png.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

BASES = {"digits": "configs/digits.py", "fashion_mnist": "configs/fashion_mnist.py:cpu-v"}
DISTILL = "configs/distill.py"
FAMILIES = ("teacher", "pd", "cd", "ct", "guided", "guided-pd", "guided-cd")
TEACHER_CELLS = [("ddim", "trailing", n) for n in (1, 2, 4, 8, 16, 50)] + [("dpmpp_2m", "logsnr", n)
                                                                           for n in (2, 4, 8, 16)]
PD_FIRST = 16       # the first student's steps (its teacher takes 32)
GUIDED_PD = (16, 8, 4)   # the progressive rounds of the guided student
W_TEACHER = (2.0, 3.0)   # the teacher's two-branch guidance cells (DDIM 8 and 50)
W_STUDENT = (1.0, 2.0, 3.0)
PAIRED = [("pd-4", "DDIM 4", "teacher", "DDIM 50"), ("pd-8", "DDIM 8", "teacher", "DDIM 50"),
          ("pd-4", "DDIM 4", "teacher", "DDIM 4"), ("pd-2", "DDIM 2", "teacher", "DPM++ 2"),
          ("pd-1", "DDIM 1", "teacher", "DDIM 1"), ("cd", "CM 1", "pd-1", "DDIM 1"), ("cd", "CM 2", "pd-2", "DDIM 2"),
          ("ct", "CM 1", "cd", "CM 1"), ("ct", "CM 2", "cd", "CM 2"), ("cd", "CM 2", "cd", "CM 1"),
          ("teacher", "DDIM 50 w=2", "teacher", "DDIM 50"), ("guided", "DDIM 50 w=1", "teacher", "DDIM 50"),
          ("guided", "DDIM 8 w=2", "teacher", "DDIM 8 w=2"), ("guided", "DDIM 50 w=2", "teacher", "DDIM 50 w=2"),
          ("guided-pd-8", "DDIM 8 w=2", "teacher", "DDIM 50 w=2"), ("guided-pd-4", "DDIM 4 w=2", "teacher",
                                                                    "DDIM 50 w=2"),
          ("guided-pd-4", "DDIM 4 w=3", "teacher", "DDIM 50 w=3"), ("guided-pd-4", "DDIM 4 w=2", "teacher",
                                                                    "DDIM 8 w=2"),
          ("guided-cd", "CM 1 w=2", "teacher", "DDIM 50 w=2"), ("guided-cd", "CM 1 w=2", "guided-pd-4", "DDIM 4 w=2"),
          ("guided-cd", "CM 1 w=1", "cd", "CM 1")]


def config_of(name: str, args) -> tuple[str, list[str]]:
    """(config file, overrides) of a model: configs/distill.py holds each method's recipe."""
    if name == "teacher":
        return BASES[args.data], []
    config, overrides = _student_config(name, args)
    return config + ("" if args.data == "digits" else "," + args.data), overrides


def _student_config(name: str, args) -> tuple[str, list[str]]:
    if name.startswith("pd-"):
        n = int(name[3:])
        teacher = args.teacher if n == PD_FIRST else os.path.join(args.root, f"pd-{2 * n}")
        return DISTILL + ":progressive", [f"distill.teacher={teacher}", f"distill.student_steps={n}",
                                          f"train.steps={args.pd_steps}"]
    if name == "cd":
        return DISTILL + ":cd", [f"distill.teacher={args.teacher}", f"train.steps={args.cd_steps}"]
    if name == "guided":
        return DISTILL + ":guidance", [f"distill.teacher={args.teacher}", f"train.steps={args.guided_steps}"]
    if name == "guided-cd":
        return DISTILL + ":guided-cd", [f"distill.teacher={args.teacher}", f"train.steps={args.cd_steps}"]
    if name.startswith("guided-pd-"):
        n = int(name[len("guided-pd-"):])
        teacher = os.path.join(args.root, "guided" if n == GUIDED_PD[0] else f"guided-pd-{2 * n}")
        return DISTILL + ":guided-pd", [f"distill.teacher={teacher}", f"distill.student_steps={n}",
                                        f"train.steps={args.pd_steps}"]
    return DISTILL + ":ct", [f"train.steps={args.ct_steps}"]


def train(name: str, args) -> dict:
    from diffusion_jax.config import load_experiment
    from diffusion_jax.train.loop import train_and_evaluate

    workdir = args.teacher if name == "teacher" else os.path.join(args.root, name)
    timing = os.path.join(workdir, "wall_time.json")
    exp = load_experiment(*config_of(name, args))[0]
    if not os.path.isfile(timing):
        t0 = time.perf_counter()
        train_and_evaluate(exp, workdir, progress=not args.no_progress)
        with open(timing, "w") as f:
            json.dump({"seconds": time.perf_counter() - t0}, f)
    return {"model": name, "workdir": workdir, "steps": exp.train.steps,
            "train_s": json.load(open(timing))["seconds"]}


def cells_of(name: str, exp, guided: bool = True) -> list[tuple[str, str, str, int, float]]:
    """(label, sampler, spacing, steps, guidance weight w) of a model's cells; w != 1 (or a student taking w) is
    in the label. guided: the teacher's two-branch guidance cells too (the guided students' references)."""
    takes_w = exp.model.guidance_embed_dim is not None
    if name == "teacher":
        return ([(f"{'DDIM' if s == 'ddim' else 'DPM++'} {n}", s, sp, n, 1.0) for s, sp, n in TEACHER_CELLS]
                + [(f"DDIM {n} w={w:g}", "ddim", "trailing", n, w) for w in W_TEACHER for n in (8, 50) if guided])
    if exp.distill.method in ("progressive", "guidance"):
        steps = (8, 50) if exp.distill.method == "guidance" else (exp.distill.student_steps,)
        if not takes_w:
            return [(f"DDIM {n}", "ddim", exp.distill.spacing, n, 1.0) for n in steps]
        return [(f"DDIM {n} w={w:g}", "ddim", exp.distill.spacing, n, w) for w in W_STUDENT for n in steps]
    ws = W_STUDENT if takes_w else (1.0,)
    return [(f"CM {n}" + (f" w={w:g}" if takes_w else ""), "consistency", exp.distill.spacing, n, w) for w in ws
            for n in (1, 2)]


def evaluate(row: dict, noise, labels, scorer, args) -> tuple[list[dict], dict]:
    import jax

    from diffusion_jax import viz
    from diffusion_jax.config import build_schedule, sampling_kwargs
    from diffusion_jax.eval.metrics.distances import kid
    from diffusion_jax.eval.metrics.paired import fd_interval
    from diffusion_jax.eval.report import wilson
    from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn, sample_from
    from diffusion_jax.train.checkpoint import load_trained

    exp, graphdef, params, _ = load_trained(row["workdir"])
    schedule = build_schedule(exp.schedule)
    mu, sigma = scorer.real_stats
    rows, kept = [], {}
    guided = any(f.startswith("guided") for f in args.models.split(","))
    for label, sampler, spacing, steps, w in cells_of(row["model"], exp, guided):
        spec = SamplerSpec(sampler, steps=steps, spacing=spacing, clip_denoised=None, guidance_scale=w)
        fn = make_sample_fn(graphdef, schedule, spec, (args.batch,) + noise.shape[1:], **sampling_kwargs(exp))
        x_T = noise * (float(schedule.sigma_max) if schedule.kind == "edm" else 1.0)
        key = jax.random.PRNGKey(7)
        sample_from(fn, params, x_T[:args.batch], labels[:args.batch], batch=args.batch, key=key)   # compile
        t0 = time.perf_counter()
        x, nfe = sample_from(fn, params, x_T, labels, batch=args.batch, key=key)
        seconds = time.perf_counter() - t0
        feats, probs = scorer.features(np.clip(x, -1.0, 1.0))
        fd = fd_interval(feats, mu, sigma, labels, seed=0)
        k, k_std = kid(feats, scorer.real_feats, subset_size=min(1000, len(feats)))
        agree = int(np.sum(probs.argmax(1) == labels))
        lo, hi = wilson(agree, len(x))
        two_branch = w != 1 and exp.model.guidance_embed_dim is None      # cond + uncond per evaluation
        rows.append({"model": row["model"], "cell": label, "w": w, "nfe": nfe,
                     "calls": nfe * (2 if two_branch else 1), "fd": fd["fd"], "fd_lo": fd["lo"],
                     "fd_hi": fd["hi"], "kid": k, "kid_std": k_std, "agree": agree / len(x), "agree_lo": lo,
                     "agree_hi": hi, "sample_s": seconds})
        kept[label] = feats
        viz.save_grid(np.clip(x[:50], -1, 1), os.path.join(args.out, "grids", f"{row['model']}_{label.replace(' ', '')}"
                                                                              ".png"), nrow=10)
    return rows, kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(BASES), default="digits", help="the teacher's data (and config)")
    p.add_argument("--models", default=",".join(FAMILIES),
                   help=f"comma-separated families of models to train and sample, of {', '.join(FAMILIES)}")
    p.add_argument("--root", default=None, help="workdirs of the models (default: workdirs/distill_DATA)")
    p.add_argument("--teacher", default=None, help="a trained run of the data's teacher config (default: "
                   "ROOT/teacher)")
    p.add_argument("--out", default=None, help="results folder (default: results/distill_DATA)")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--batch", type=int, default=500, help="samples per compiled call")
    p.add_argument("--pd-steps", type=int, default=1000, help="updates per progressive round")
    p.add_argument("--cd-steps", type=int, default=2500)
    p.add_argument("--ct-steps", type=int, default=5000)
    p.add_argument("--guided-steps", type=int, default=1000, help="updates of guidance distillation (stage one)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    families = args.models.split(",")
    if "teacher" not in families or not set(families) <= set(FAMILIES):
        p.error(f"--models: a comma-separated subset of {', '.join(FAMILIES)} that includes teacher, "
                f"got {args.models!r}")
    args.command = " ".join(["python experiments/distill.py", *(sys.argv[1:] if argv is None else argv)])
    args.root = args.root or f"workdirs/distill_{args.data}"
    args.out = args.out or f"results/distill_{args.data}"
    args.teacher = args.teacher or os.path.join(args.root, "teacher")
    from diffusion_jax.host import reuse_host_memory

    reuse_host_memory()
    import jax

    from diffusion_jax.config import load_experiment
    from diffusion_jax.eval.evaluate import Scorer, balanced_labels

    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    names = {"teacher": ["teacher"], "pd": [f"pd-{PD_FIRST >> k}" for k in range(PD_FIRST.bit_length())],
             "cd": ["cd"], "ct": ["ct"], "guided": ["guided"], "guided-pd": [f"guided-pd-{n}" for n in GUIDED_PD],
             "guided-cd": ["guided-cd"]}
    if "guided-pd" in families and "guided" not in families:
        families.append("guided")        # the first round's teacher
    models = [train(name, args) for family in FAMILIES if family in families for name in names[family]]
    teacher = load_experiment(BASES[args.data])[0]
    scorer = Scorer.for_experiment(teacher, progress=not args.no_progress)
    m = teacher.model
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(2026), (args.num, m.image_size, m.image_size,
                                                                    m.in_channels)))
    labels = balanced_labels(args.num, 10)
    cells, kept = [], {}
    for row in models:
        rows, kept[row["model"]] = evaluate(row, noise, labels, scorer, args)
        cells += rows
    paired = paired_rows(kept, scorer, labels)
    floor = scorer.real_floor(args.num)
    write(args, models, cells, paired, floor, time.perf_counter() - t_start)
    return 0


def paired_rows(kept: dict, scorer, labels) -> list[dict]:
    from diffusion_jax.eval.metrics.paired import paired_fd_difference, verdict_text

    mu, sigma = scorer.real_stats
    rows = []
    for a, ca, b, cb in PAIRED:
        if ca in kept.get(a, {}) and cb in kept.get(b, {}):
            d = paired_fd_difference(kept[a][ca], kept[b][cb], mu, sigma, labels, seed=0)
            rows.append({"a": f"{a} {ca}", "b": f"{b} {cb}", "diff": d["diff"], "lo": d["lo"], "hi": d["hi"],
                         "verdict": verdict_text(d, f"{a} {ca}", f"{b} {cb}")})
    return rows


def _ci(v, lo, hi, d=2) -> str:
    return f"{v:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"


def write(args, models, cells, paired, floor, seconds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion_jax.eval.report import markdown_table, write_csv

    for rows, name in ((cells, "cells"), (paired, "paired"), (models, "models")):
        write_csv(rows, os.path.join(args.out, f"{name}.csv"))
    lines = [f"# Few-step generation on {args.data} ({args.num} samples per cell)", "",
             f"`{args.command}`: {seconds / 60:.0f} min on this machine "
             "(training included when the workdirs were new).", "", "## Models", "",
             markdown_table(["model", "updates", "train s"],
                            [[m["model"], str(m["steps"]), f"{m['train_s']:.0f}"] for m in models]), "",
             f"Floor (real vs real, {floor['num']} training images vs the held-out reference): FD {floor['fd']:.2f}, "
             f"KID {floor['kid']:.4f}.", "", "## Quality and sampling time per cell", "",
             markdown_table(["model", "sampler", "w", "NFE", "network calls", "FD (95% CI)", "KID",
                             "class agreement (95% CI)", f"s / {args.num} samples"],
                            [[c["model"], c["cell"], f"{c['w']:g}", str(c["nfe"]), str(c["calls"]),
                              _ci(c["fd"], c["fd_lo"], c["fd_hi"]),
                              f"{c['kid']:.4f} ± {c['kid_std']:.4f}", _ci(c["agree"], c["agree_lo"], c["agree_hi"], 3),
                              f"{c['sample_s']:.2f}"] for c in cells]),
             "", "## Paired comparisons (same x_T and labels; FD(a) - FD(b), paired bootstrap)", "",
             *[f"- {r['verdict']}" for r in paired], ""]
    with open(os.path.join(args.out, f"distill_{args.data}.md"), "w") as f:
        f.write("\n".join(lines))
    def group(c):
        """The curve of a cell in the plots: the teacher per solver, progressive rounds together."""
        if c["model"] == "teacher":
            return "teacher " + c["cell"].split()[0] + (" (two-branch guidance)" if c["w"] != 1 else "")
        if c["model"].startswith("guided-pd-"):
            return "guided progressive distillation (w input)"
        if c["model"] == "guided":
            return "guided student (w input)"
        return "progressive distillation" if c["model"].startswith("pd-") else c["model"]

    for name, keep, title in (("fd_vs_nfe.png", lambda c: c["w"] == 1 and not c["model"].startswith("guided"),
                               "no guidance"),
                              ("guided_fd_vs_nfe.png", lambda c: c["w"] == 2, "classifier-free guidance w = 2")):
        if not any(map(keep, cells)):     # e.g. no guided models in --models
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups = {}
        for c in filter(keep, cells):
            groups.setdefault(group(c), []).append(c)
        for key, rows in groups.items():     # the basic bootstrap interval may exclude the (biased) estimate
            rows = sorted(rows, key=lambda c: c["calls"])
            calls = [c["calls"] for c in rows]
            line, = ax.plot(calls, [c["fd"] for c in rows], marker="o", label=key)
            ax.vlines(calls, [c["fd_lo"] for c in rows], [c["fd_hi"] for c in rows], color=line.get_color())
        ax.axhline(floor["fd"], color="k", ls=":", label="real vs real")
        ax.set(xscale="log", yscale="log", xlabel="NFE (network calls per sample)", ylabel="FD (classifier features)",
               title=title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, name), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
