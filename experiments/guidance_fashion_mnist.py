"""Guidance on class-conditional Fashion-MNIST (CPU scale): how often does the project's clean-image classifier
agree with the requested class, without guidance, with classifier-free guidance and with classifier guidance?

    python experiments/guidance_fashion_mnist.py                      # full run: 30-45 min on 2 CPU cores
    python experiments/guidance_fashion_mnist.py --config.train.steps=300 --classifier-steps 300 --num 20 \\
        --steps 20 --workdir /tmp/fm_small --out /tmp/guidance_small  # reduced: 9 min on 2 busy CPU cores

Full run, measured parts scaled up (2 CPU cores shared with another job): diffusion training 2,000 steps at
~0.9 s/step (estimated ~0.45 s/step on idle cores), the noise-conditional classifier ~2.5 min, the clean classifier ~1 min
(once, cached), sampling 7 methods x 1,000 samples x 50 DDIM steps ~10-15 min.

1. trains configs/fashion_mnist.py:cpu in WORKDIR (resumed; a finished run is reused) -- label dropout 0.1, so the
   same network is also the unconditional model of classifier-free guidance;
2. trains the noise-conditional classifier p_phi(y | x_t, t) on the run's data and schedule (`diffusion_jax.inference.guidance`;
   WORKDIR/noisy_classifier, reused when finished);
3. for every requested class draws --num samples with each method from the same initial noise (sample i of every
   method starts from the same x_T): none (the conditional model, w = 1), CFG at --cfg-scales (Ho & Salimans
   2022), classifier guidance at --cg-scales on the conditional model, and, with --uncond-cg-scales, the null-class
   (unconditional) model alone and with classifier guidance (Dhariwal & Nichol's setting);
4. scores every sample with the clean classifier `metrics.classifier.get_classifier("fashion_mnist", 16)` (a
   different network from the guiding one, trained on clean images only) and reports the agreement rate with a
   Wilson 95% interval, the paired difference against "none" (same noise, so a paired 95% interval), the mean
   probability the clean classifier gives the requested class, and per-class rates.

Output in OUT (default results/guidance): results.md, results.csv (one row per method), per_class.csv,
grids/<method>.png (one row per class, --grid-cols samples each).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffusion_jax.eval import report  # noqa: E402
from diffusion_jax import viz
from diffusion_jax.eval.report import paired_diff, wilson  # noqa: E402
from diffusion_jax.config import build_schedule, load_experiment  # noqa: E402
from diffusion_jax.data.sources import FASHION_MNIST_CLASSES  # noqa: E402
from diffusion_jax.train.classifier import ClassifierRecipe, load_noisy_classifier, train_noisy_classifier  # noqa: E402
from diffusion_jax.train.guided import make_classifier_guided_sample_fn  # noqa: E402
from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "fashion_mnist.py")


def methods(args) -> list[tuple[str, str, float]]:
    """(name, kind, scale): kind none | cfg | cg | uncond | uncond_cg."""
    rows = [("none", "none", 1.0)]
    rows += [(f"cfg w={w:g}", "cfg", w) for w in args.cfg_scales]
    rows += [(f"classifier w={w:g}", "cg", w) for w in args.cg_scales]
    if args.uncond_cg_scales:
        rows.append(("unconditional", "uncond", 0.0))
        rows += [(f"unconditional + classifier w={w:g}", "uncond_cg", w) for w in args.uncond_cg_scales]
    return rows


def build_sampler(kind: str, scale: float, exp, graphdef, clf, base: SamplerSpec, batch: int):
    """sample(params, key, y) -> (images, nfe) for one method."""
    shape = (batch, exp.model.image_size, exp.model.image_size, exp.model.in_channels)
    schedule, m = build_schedule(exp.schedule), exp.model
    common = dict(prediction=exp.loss.prediction, learn_sigma=m.learn_sigma, num_classes=m.num_classes)
    if kind in ("none", "cfg"):
        spec = SamplerSpec(base.sampler, base.steps, base.spacing, base.clip_denoised, base.options,
                           guidance_scale=scale)
        return make_sample_fn(graphdef, schedule, spec, shape, **common)
    return make_classifier_guided_sample_fn(graphdef, schedule, base, shape, clf, scale,
                                            unconditional_model=kind.startswith("uncond"), **common)


def draw(sample, params, labels: np.ndarray, batch: int, seed: int, bar) -> tuple[np.ndarray, int]:
    """Images for `labels`, chunk c from fold_in(PRNGKey(seed), c): the same x_T per index for every method."""
    out, nfe = [], 0
    for c, start in enumerate(range(0, len(labels), batch)):
        y = np.resize(labels[start:start + batch], batch)   # the last chunk padded: one compile
        x, nfe = sample(params, jax.random.fold_in(jax.random.PRNGKey(seed), c), y)
        out.append(np.asarray(x)[:len(labels) - start])
        bar.update(1)
    return np.clip(np.concatenate(out), -1.0, 1.0), nfe


def score(name, kind, scale, images, labels, clean, baseline, nfe, seconds, classes):
    """(table row, per-class rows, per-sample agreement) of one method."""
    probs = clean.probs(images)
    agree = probs.argmax(1) == labels
    lo, hi = wilson(int(agree.sum()), len(agree))
    diff, diff_ci = paired_diff(agree, baseline) if baseline is not None else (0.0, 0.0)
    row = {"method": name, "kind": kind, "scale": scale, "n": len(agree), "agreement": float(agree.mean()),
           "ci_low": lo, "ci_high": hi, "diff_vs_none": diff, "diff_ci": diff_ci,
           "mean_prob_requested": float(probs[np.arange(len(labels)), labels].mean()), "nfe": nfe,
           "seconds": round(seconds, 1)}
    per_class = [{"method": name, "class": int(c), "name": FASHION_MNIST_CLASSES[c],
                  "agreement": float(agree[labels == c].mean())} for c in classes]
    return row, per_class, agree


def markdown(rows, per_class, info) -> str:
    header = ["method", "agreement (95% CI)", "vs none (paired 95% CI)", "mean p(requested)", "NFE", "s"]
    body = [[r["method"], f"{r['agreement']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
             "—" if r["kind"] == "none" else f"{r['diff_vs_none']:+.3f} ± {r['diff_ci']:.3f}",
             f"{r['mean_prob_requested']:.3f}", r["nfe"], r["seconds"]] for r in rows]
    names = list(dict.fromkeys(p["method"] for p in per_class))
    cls = list(dict.fromkeys((p["class"], p["name"]) for p in per_class))
    cell = {(p["method"], p["class"]): f"{p['agreement']:.2f}" for p in per_class}
    by_class = [[f"{c} {n}"] + [cell[(m, c)] for m in names] for c, n in cls]
    text = ("# Guidance on class-conditional Fashion-MNIST (CPU scale)\n\n"
            "Agreement = how often the project's clean-image classifier (trained on real images only, not the guiding "
            "classifier) predicts the requested class. Same initial noise for every method (paired).\n\n"
            + report.markdown_table(header, body) + "\n## Per class\n\n"
            + report.markdown_table(["class"] + names, by_class)
            + "\n## Settings\n\n```json\n" + json.dumps(info, indent=1, default=str) + "\n```\n")
    return text


def parse(argv):
    floats = lambda s: [float(v) for v in s.split(",") if v.strip()]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="--config.KEY=VALUE overrides configs/fashion_mnist.py:cpu (the diffusion run)")
    p.add_argument("--workdir", default="workdirs/fmnist_cpu")
    p.add_argument("--classifier-dir", default=None, help="default WORKDIR/noisy_classifier")
    p.add_argument("--classifier-steps", type=int, default=2000)
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--num", type=int, default=100, help="samples per class and method")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scales", type=floats, default=[2.0, 4.0])
    p.add_argument("--cg-scales", type=floats, default=[1.0, 3.0])
    p.add_argument("--uncond-cg-scales", type=floats, default=[3.0],
                   help="classifier guidance of the null-class model ('' to skip it and its baseline)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-cols", type=int, default=10)
    p.add_argument("--out", default="results/guidance")
    args, extra = p.parse_known_args(argv)
    bad = [e for e in extra if not e.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [e[len("--config."):] for e in extra]
    args.classes = [int(c) for c in args.classes.split(",")]
    if not args.classes or any(not 0 <= c < 10 for c in args.classes) or args.num < 1 or args.batch_size < 1:
        p.error("--classes must be ints in [0, 10), --num and --batch-size >= 1")
    return args


def main(argv=None) -> int:
    from diffusion_jax.eval.metrics.classifier import get_classifier
    from diffusion_jax.train.checkpoint import load_trained
    from diffusion_jax.train.loop import train_and_evaluate

    args = parse(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    exp, _ = load_experiment(CONFIG + ":cpu", args.overrides)
    train_and_evaluate(exp, args.workdir)                                  # a finished run is reused as it is
    clf_dir = args.classifier_dir or os.path.join(args.workdir, "noisy_classifier")
    clf_result = train_noisy_classifier(args.workdir, clf_dir, ClassifierRecipe(steps=args.classifier_steps))
    exp, graphdef, params, step = load_trained(args.workdir)
    clf = load_noisy_classifier(clf_dir)
    clean = get_classifier("fashion_mnist", exp.model.image_size)
    base = SamplerSpec.from_config(exp.sample)
    base = SamplerSpec(args.sampler, args.steps, base.spacing, base.clip_denoised,
                       base.options if args.sampler == base.sampler else ())
    labels = np.repeat(np.asarray(args.classes, np.int32), args.num)
    batch = min(args.batch_size, len(labels))
    todo = methods(args)
    bar = tqdm(total=len(todo) * math.ceil(len(labels) / batch), desc="sampling", unit="chunk")
    rows, per_class, baseline = [], [], None
    os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)
    for name, kind, scale in todo:
        bar.set_postfix(method=name)
        t = time.perf_counter()
        images, nfe = draw(build_sampler(kind, scale, exp, graphdef, clf, base, batch), params, labels, batch,
                           args.seed, bar)
        row, pc, agree = score(name, kind, scale, images, labels, clean, baseline, nfe, time.perf_counter() - t,
                               args.classes)
        baseline = agree if kind == "none" else baseline
        rows.append(row)
        per_class += pc
        shown = np.concatenate([images[labels == c][:args.grid_cols] for c in args.classes])
        viz.save_grid(shown, os.path.join(args.out, "grids", name.replace(" ", "_").replace("=", "") + ".png"),
                      nrow=min(args.grid_cols, args.num))
    bar.close()
    info = {"workdir": args.workdir, "diffusion_step": step, "train_steps": exp.train.steps,
            "sampler": base.sampler, "steps": base.steps, "spacing": base.spacing, "seed": args.seed,
            "per_class": args.num, "classes": args.classes, "noisy_classifier": clf_dir,
            "noisy_classifier_accuracy_by_level": clf_result["accuracy_by_level"],
            "clean_classifier": clean.name, "clean_classifier_test_accuracy": clean.test_accuracy,
            "total_seconds": round(time.perf_counter() - t0, 1)}
    report.write_results(args.out, rows, per_class, markdown(rows, per_class, info))
    print(f"-> {args.out}/results.md, results.csv, per_class.csv, grids/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
