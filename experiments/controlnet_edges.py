"""ControlNet on the default digits model: do the samples follow the control edges, and is the base model intact?

    python experiments/controlnet_edges.py            # trains what is missing, then evaluates (see docs/results.md)

1. trains configs/digits.py in --base-workdir (resumed; a finished run is reused), then configs/controlnet_digits.py
   on top of it in --workdir (the base locked; only the ControlNet's parameters train);
2. takes the edge maps of the run's condition (`model.condition`, Canny for configs/controlnet_digits.py) of the 180 held-out digits (the test split, never seen
   in training) as control images, each with its digit's label, and draws --seeds samples per control image with
   DDIM (--steps, trailing): the base model alone, and the ControlNet at every --scales conditioning_scale. Every arm
   starts sample i from the same noise with the same label, so the arms are paired;
3. scores every sample: edge IoU and Chamfer distance between the control and the sample's own edges (the same
   condition, `eval.metrics.edges`), and class agreement of the project's digits classifier with the requested label;
4. reports each arm with 95% intervals and its paired difference to the base model. The intervals resample the
   180 control images (each with its seeds), not the samples: the samples of one control are not independent.
   Floors: the edges of another held-out digit of the same class (what the label alone explains) and the source
   digit itself (IoU 1 by construction). It also checks that conditioning_scale 0 gives the base model's samples
   bit for bit.

Output in --out (default results/controlnet): results.md, results.csv (one row per arm), grid.png (per class:
condition | source digit | base | ControlNet at scale 1, two seeds each), scale.png (IoU and class agreement vs
conditioning_scale).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import viz  # noqa: E402
from diffusion_jax.config import build_schedule  # noqa: E402
from diffusion_jax.data.conditions import make_condition  # noqa: E402
from diffusion_jax.data.sources import load_digits  # noqa: E402
from diffusion_jax.eval import report  # noqa: E402
from diffusion_jax.fileio import atomic_write  # noqa: E402
from diffusion_jax.eval.metrics import get_classifier  # noqa: E402
from diffusion_jax.eval.metrics.edges import (  # noqa: E402
    chamfer_distance,
    cluster_mean_interval,
    edge_iou,
    paired_cluster_difference,
)
from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn  # noqa: E402
from diffusion_jax.train.checkpoint import load_trained  # noqa: E402
from diffusion_jax.train.runs import load_run, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-workdir", default="workdirs/digits")
    p.add_argument("--workdir", default="workdirs/digits_controlnet")
    p.add_argument("--base-config", default=os.path.join(ROOT, "configs", "digits.py"))
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "controlnet_digits.py"))
    p.add_argument("--seeds", type=int, default=3, help="samples per control image (180 control images)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (trailing spacing)")
    p.add_argument("--scales", default="0,0.25,0.5,1", help="conditioning_scale values, comma-separated")
    p.add_argument("--out", default="results/controlnet")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def ensure_trained(spec: str, workdir: str, overrides=(), progress=True) -> float:
    t0 = time.perf_counter()
    train(load_run(spec, overrides), workdir, progress=progress)
    return time.perf_counter() - t0


def sample_arms(args, scales):
    """{arm: images (seeds * 180, 8, 8, 1)}, the controls, labels and cluster ids, all in seed-major order."""
    test = load_digits("test", 8).get(np.arange(180))
    real, labels = test["image"], test["label"]
    exp_b, graph_b, params_b, _ = load_trained(args.base_workdir)
    exp_c, graph_c, params_c, _ = load_trained(args.workdir)
    controls = make_condition(exp_c.model.condition, real)
    spec = SamplerSpec("ddim", steps=args.steps, spacing="trailing", clip_denoised=1.0)
    shape = (len(real), 8, 8, 1)
    kw = dict(prediction=exp_b.loss.prediction, num_classes=10)
    base_fn = make_sample_fn(graph_b, build_schedule(exp_b.schedule), spec, shape, **kw)
    ctrl_fn = make_sample_fn(graph_c, build_schedule(exp_c.schedule), spec, shape, **kw)
    arms = {"base": [], "ControlNet, no control": [], **{f"scale {s:g}": [] for s in scales}}
    for seed in range(args.seeds):
        key = jax.random.PRNGKey(seed)
        arms["base"].append(np.asarray(base_fn(params_b, key, labels)[0]))
        arms["ControlNet, no control"].append(np.asarray(ctrl_fn(params_c, key, labels)[0]))
        for s in scales:
            control = {"control": controls, "conditioning_scale": np.float32(s)}
            arms[f"scale {s:g}"].append(np.asarray(ctrl_fn(params_c, key, labels, control=control)[0]))
    arms = {k: np.concatenate(v) for k, v in arms.items()}
    tile = lambda a: np.concatenate([a] * args.seeds)   # noqa: E731
    clusters = tile(np.arange(len(real)))
    return arms, real, tile(controls), tile(labels), clusters, exp_c.model.condition


def same_class_other(real, labels):
    """For each held-out digit, the next held-out digit of the same class (cyclically): the label-only floor."""
    out = np.empty_like(real)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out[idx] = real[np.roll(idx, -1)]
    return out


def main(argv=None):
    args = parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    t_base = ensure_trained(args.base_config, args.base_workdir, progress=progress)
    t_ctrl = ensure_trained(args.config, args.workdir, [f"model.base_workdir={args.base_workdir}"],
                            progress=progress)
    t0 = time.perf_counter()
    arms, real, controls, labels, clusters, condition = sample_arms(args, scales)
    t_sample = time.perf_counter() - t0

    classifier = get_classifier("digits", 8, progress=progress)
    n_real = len(real)
    floors = {"real: the source digit": real, "real: another digit of its class": same_class_other(real, labels[:n_real])}
    rows, per_sample = [], {}
    for name, images in {**{k: np.concatenate([v] * args.seeds) for k, v in floors.items()}, **arms}.items():
        edges = make_condition(condition, images)   # the sample's edges, found as the control's were
        agree = (classifier.probs(images).argmax(axis=1) == labels).astype(np.float64)
        per_sample[name] = {"iou": edge_iou(controls, edges), "chamfer": chamfer_distance(controls, edges),
                            "agree": agree}
    base = per_sample["base"]
    for name, m in per_sample.items():
        row = {"arm": name, "n": len(labels), "controls": n_real}
        for metric in ("iou", "chamfer", "agree"):
            ci = cluster_mean_interval(m[metric], clusters)
            row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"] = ci["mean"], ci["lo"], ci["hi"]
            if name != "base" and not name.startswith("real"):
                d = paired_cluster_difference(m[metric], base[metric], clusters)
                row[f"{metric}_diff"], row[f"{metric}_diff_lo"], row[f"{metric}_diff_hi"] = d["diff"], d["lo"], d["hi"]
                row[f"{metric}_verdict"] = _verdict(d, name, metric)
        rows.append(row)
    identical = {name: bool(np.array_equal(arms[name], arms["base"])) for name in ("ControlNet, no control", "scale 0")
                 if name in arms}
    report.write_csv(rows, os.path.join(args.out, "results.csv"))
    write_markdown(args, rows, identical, dict(base=t_base, controlnet=t_ctrl, sample=t_sample), condition)
    write_figures(args, arms, real, controls, labels, scales, rows)
    print(open(os.path.join(args.out, "results.md")).read())


_NAMES = {"iou": ("edge IoU", True), "chamfer": ("Chamfer distance", False), "agree": ("class agreement", True)}


def _verdict(d, name, metric):
    """One line: the paired difference arm - base and what it means for this metric (IoU, agreement: higher is
    better; Chamfer: lower is better)."""
    label, higher_better = _NAMES[metric]
    est = f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
    if d["lo"] > 0 or d["hi"] < 0:
        up = d["lo"] > 0
        return f"{name}: {label} {'higher' if up else 'lower'} than the base model ({'better' if up == higher_better else 'worse'}), {est}"
    return f"{name}: {label} not separable from the base model at 95%, {est}"


def _ci(row, metric, digits=3):
    return f"{row[metric]:.{digits}f} [{row[metric + '_lo']:.{digits}f}, {row[metric + '_hi']:.{digits}f}]"


def _diff(row, metric, digits=3):
    if f"{metric}_diff" not in row:
        return ""
    return (f"{row[metric + '_diff']:+.{digits}f} [{row[metric + '_diff_lo']:+.{digits}f}, "
            f"{row[metric + '_diff_hi']:+.{digits}f}]")


def write_markdown(args, rows, identical, times, condition):
    header = ["arm", f"{condition} edge IoU (higher: follows)", "Chamfer px (lower)", "class agreement",
              "IoU - base (paired)", "Chamfer - base (paired)", "agreement - base (paired)"]
    table = report.markdown_table(header, [[r["arm"], _ci(r, "iou"), _ci(r, "chamfer", 2), _ci(r, "agree"),
                                            _diff(r, "iou"), _diff(r, "chamfer", 2), _diff(r, "agree")]
                                           for r in rows])
    verdicts = "\n".join(f"- {r[m + '_verdict']}" for r in rows if "iou_verdict" in r and not identical.get(r["arm"])
                         for m in ("iou", "chamfer", "agree"))
    same = "; ".join(f"{k}: {'bit-identical' if v else 'DIFFERENT'} to the base model's samples"
                     for k, v in identical.items())
    text = (f"# ControlNet on digits: Sobel edges of {rows[0]['controls']} held-out digits x {args.seeds} seeds "
            f"(n = {rows[0]['n']} per arm), DDIM {args.steps} steps\n\n{table}\n\n95% intervals resample the "
            f"control images (clusters of {args.seeds} seeds). Paired differences: same noise and label in every "
            f"arm.\n\n{verdicts}\n\n{same}.\n\nTimes: base training {times['base']:.0f} s, ControlNet training "
            f"{times['controlnet']:.0f} s (a finished run is only loaded), sampling {times['sample']:.0f} s.\n")
    atomic_write(os.path.join(args.out, "results.md"), lambda f: f.write(text.encode()))


def write_figures(args, arms, real, controls, labels, scales, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(real)
    first = [int(np.flatnonzero(labels[:n] == c)[0]) for c in range(10)]
    tiles = []
    top = f"scale {max(scales):g}"
    for i in first:   # condition | source | base (2 seeds) | ControlNet at the largest scale (2 seeds)
        j = (n + i) % len(arms["base"])
        tiles += [controls[i] * 2 - 1, real[i], arms["base"][i], arms["base"][j], arms[top][i], arms[top][j]]
    viz.save_grid(np.stack(tiles), os.path.join(args.out, "grid.png"), nrow=6)

    by = {r["arm"]: r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, label in ((axes[0], "iou", "edge IoU with the control"), (axes[1], "agree", "class agreement")):
        ys = [by[f"scale {s:g}"] for s in scales]
        ax.errorbar(scales, [r[metric] for r in ys], yerr=[[r[metric] - r[metric + "_lo"] for r in ys],
                                                            [r[metric + "_hi"] - r[metric] for r in ys]],
                    marker="o", capsize=3, label="ControlNet")
        ax.axhline(by["base"][metric], color="gray", ls="--", label="base (no control)")
        ax.axhline(by["real: another digit of its class"][metric], color="gray", ls=":", label="real, same class")
        ax.set_xlabel("conditioning_scale")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "scale.png"), dpi=120)


if __name__ == "__main__":
    main()
