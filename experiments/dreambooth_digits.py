"""DreamBooth on the default digits model: does the identifier [V] draw the subject, and does prior preservation
keep the subject's class (3) from drifting towards it?

    python experiments/dreambooth_digits.py            # trains what is missing, then evaluates (see docs/results.md)

1. trains configs/digits.py in --base-workdir (a finished run is reused), then configs/dreambooth_digits.py three
   times on top of it: the recipe (prior preservation, lambda = 1, 200 class images of label 3 drawn by the base;
   [V]'s embedding the 3's plus an offset) in --workdir, without the prior (lambda = 0) in --workdir-noprior, and
   with the prior but [V] an exact copy of the 3's embedding (identifier_offset = 0) in --workdir-copy. Same seed,
   steps and subject; the subject is five held-out 3s written bold (grey dilation; configs/subjects/bold_three,
   checked here against the test split they come from);
2. draws --num samples per arm with DDIM (--steps, trailing): the base model's 3s, and each fine-tuned model's 3s
   (label 3) and [V]s (label 10). Sample i starts from the same noise in every arm, so the arms are paired;
3. scores every sample: its RMS pixel distance to the nearest subject image (lower: more like the subject), its ink
   (mean brightness in [0, 1]; the subject is bold), and whether the project's digits classifier reads a 3. Also the
   diversity of each arm: the mean RMS distance between two of its samples (bootstrap interval);
4. reports each arm with 95% intervals and the paired differences that answer the two questions, with floors: real
   3s of the training split (what "a 3" is, 0.7 from the subject) and the subject images themselves (leave one out).

Output in --out (default results/dreambooth): results.md, results.csv (one row per arm), paired.csv, grid.png (rows:
the subject, then the base's 3s, then for each run its [V]s and its 3s, the same seeds in every row).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from diffusion_jax import viz  # noqa: E402
from diffusion_jax.config import build_schedule  # noqa: E402
from diffusion_jax.data.sources import load_digits  # noqa: E402
from diffusion_jax.eval import report  # noqa: E402
from diffusion_jax.eval.metrics import get_classifier  # noqa: E402
from diffusion_jax.fileio import atomic_write  # noqa: E402
from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn  # noqa: E402
from diffusion_jax.train.checkpoint import load_trained  # noqa: E402
from diffusion_jax.train.runs import load_run, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECT_DIR = os.path.join(ROOT, "configs", "subjects", "bold_three")
CLASS = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-workdir", default="workdirs/digits")
    p.add_argument("--workdir", default="workdirs/digits_dreambooth")
    p.add_argument("--workdir-noprior", default="workdirs/digits_dreambooth_noprior")
    p.add_argument("--workdir-copy", default="workdirs/digits_dreambooth_copy")
    p.add_argument("--base-config", default=os.path.join(ROOT, "configs", "digits.py"))
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "dreambooth_digits.py"))
    p.add_argument("--num", type=int, default=1000, help="samples per arm")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (trailing spacing)")
    p.add_argument("--out", default="results/dreambooth")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def bold_threes() -> np.ndarray:
    """(5, 8, 8, 1) in [-1, 1]: the first five 3s of the digits test split, grey-dilated over 2x2 pixels."""
    test = load_digits("test", 8).get(np.arange(180))
    idx = np.flatnonzero(test["label"] == CLASS)[:5]
    return np.stack([ndimage.grey_dilation(test["image"][i, ..., 0], size=(2, 2)) for i in idx])[..., None]


def check_subject_files() -> np.ndarray:
    """The subject images as shipped (PNG, 8-bit), checked against `bold_threes` (to PNG quantisation)."""
    files = sorted(glob.glob(os.path.join(SUBJECT_DIR, "*.png")))
    shipped = np.stack([np.asarray(Image.open(f).convert("L"), np.float32) / 127.5 - 1 for f in files])[..., None]
    if shipped.shape != (5, 8, 8, 1) or np.abs(shipped - bold_threes()).max() > 1 / 255 + 1e-6:
        raise SystemExit(f"{SUBJECT_DIR} does not hold the five bold 3s this experiment expects")
    return shipped


def ensure_trained(spec: str, workdir: str, overrides=(), progress=True) -> float:
    t0 = time.perf_counter()
    train(load_run(spec, overrides), workdir, progress=progress)
    return time.perf_counter() - t0


def sample_arms(args) -> dict[str, np.ndarray]:
    """{arm: (num, 8, 8, 1) samples}; sample i of every arm starts from the same noise (key, i)."""
    spec = SamplerSpec("ddim", steps=args.steps, spacing="trailing", clip_denoised=1.0)
    key = jax.random.PRNGKey(0)
    arms = {}
    runs = [("base", args.base_workdir, {"3": CLASS}), ("prior", args.workdir, {"[V]": 10, "3": CLASS}),
            ("no prior", args.workdir_noprior, {"[V]": 10, "3": CLASS}),
            ("[V] = copy of 3", args.workdir_copy, {"[V]": 10, "3": CLASS})]
    for run, workdir, labels in runs:
        exp, graphdef, params, _ = load_trained(workdir)
        fn = make_sample_fn(graphdef, build_schedule(exp.schedule), spec, (args.num, 8, 8, 1),
                            prediction=exp.loss.prediction, num_classes=exp.model.num_classes)
        for name, label in labels.items():
            y = np.full((args.num,), label, np.int32)
            arms[f"{run}: {name}"] = np.asarray(fn(params, key, y)[0])
    return arms


def rms_to_nearest(images: np.ndarray, subject: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
    """(N,) RMS pixel distance of each image to its nearest subject image (excluding itself when leave_one_out)."""
    a, b = images.reshape(len(images), -1), subject.reshape(len(subject), -1)
    d = np.sqrt(((a[:, None] - b[None]) ** 2).mean(-1))
    if leave_one_out:
        np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def diversity(images: np.ndarray, num_resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean RMS distance between two different samples, with a 95% bootstrap interval (resampling the samples)."""
    a = images.reshape(len(images), -1).astype(np.float64)
    sq = (a ** 2).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * a @ a.T, 0) / a.shape[1])
    n = len(a)
    est = d.sum() / (n * (n - 1))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(num_resamples):
        i = rng.integers(0, n, n)
        sub = d[np.ix_(i, i)]
        same = i[:, None] == i[None]
        boots.append(sub[~same].mean())
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(est), float(lo), float(hi)


def score(images, subject, classifier, leave_one_out=False) -> dict[str, np.ndarray]:
    return {"dist": rms_to_nearest(images, subject, leave_one_out),
            "ink": ((images + 1) / 2).mean(axis=(1, 2, 3)),
            "is3": (classifier.probs(images).argmax(axis=1) == CLASS).astype(np.float64)}


def main(argv=None):
    args = parse_args(argv)
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    subject = check_subject_files()
    times = {"base": ensure_trained(args.base_config, args.base_workdir, progress=progress)}
    base = [f"model.base_workdir={args.base_workdir}"]
    times["prior"] = ensure_trained(args.config, args.workdir, base, progress=progress)
    times["no prior"] = ensure_trained(args.config, args.workdir_noprior, [*base, "model.prior_loss_weight=0.0"],
                                       progress=progress)
    times["copy"] = ensure_trained(args.config, args.workdir_copy, [*base, "model.identifier_offset=0.0"],
                                   progress=progress)
    t0 = time.perf_counter()
    arms = sample_arms(args)
    times["sample"] = time.perf_counter() - t0

    classifier = get_classifier("digits", 8, progress=progress)
    train_split = load_digits("train", 8).get(np.arange(load_digits("train", 8).num_examples))
    real3 = train_split["image"][train_split["label"] == CLASS]
    per = {"real 3s (train split)": score(real3, subject, classifier),
           "subject (leave one out)": score(subject, subject, classifier, leave_one_out=True)}
    per.update({name: score(images, subject, classifier) for name, images in arms.items()})
    rows = []
    for name, m in per.items():
        row = {"arm": name, "n": len(m["dist"])}
        for metric, values in m.items():
            mean, half = report.mean_ci(values)
            row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"] = mean, mean - half, mean + half
        images = arms.get(name, real3 if name.startswith("real") else subject)
        row["div"], row["div_lo"], row["div_hi"] = diversity(images) if len(images) > 20 else (np.nan,) * 3
        rows.append(row)
    pairs = [("prior: [V]", "base: 3", "does [V] draw the subject? (prior)"),
             ("no prior: [V]", "base: 3", "does [V] draw the subject? (no prior)"),
             ("prior: 3", "base: 3", "class 3 after fine-tuning with the prior"),
             ("no prior: 3", "base: 3", "class 3 after fine-tuning without the prior"),
             ("prior: 3", "no prior: 3", "what the prior preserves"),
             ("[V] = copy of 3: 3", "base: 3", "class 3 with the prior, [V] starting as a copy of 3"),
             ("prior: 3", "[V] = copy of 3: 3", "what the identifier's offset preserves")]
    diffs = []
    for a, b, question in pairs:
        row = {"question": question, "a": a, "b": b}
        for metric in ("dist", "ink", "is3"):
            row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"] = _paired(per[a][metric], per[b][metric])
        diffs.append(row)
    report.write_csv(rows, os.path.join(args.out, "results.csv"))
    report.write_csv(diffs, os.path.join(args.out, "paired.csv"))
    write_markdown(args, rows, diffs, times)
    write_grid(args, arms, subject)
    print(open(os.path.join(args.out, "results.md")).read())


def _paired(a, b):
    mean, half = report.paired_diff(np.asarray(a), np.asarray(b))
    return mean, mean - half, mean + half


def _ci(row, metric, digits=3):
    return f"{row[metric]:.{digits}f} [{row[metric + '_lo']:.{digits}f}, {row[metric + '_hi']:.{digits}f}]"


def _signed(row, metric, digits=3):
    return f"{row[metric]:+.{digits}f} [{row[metric + '_lo']:+.{digits}f}, {row[metric + '_hi']:+.{digits}f}]"


def _verdicts(diffs) -> list[str]:
    """One line per question, read off the paired interval of the distance to the subject (and class agreement)."""
    out = []
    for d in diffs:
        lo, hi = d["dist_lo"], d["dist_hi"]
        if hi < 0:
            moved = f"closer to the subject than {d['b']} by {-d['dist']:.3f} (interval {lo:+.3f}, {hi:+.3f})"
        elif lo > 0:
            moved = f"farther from the subject than {d['b']} by {d['dist']:.3f} (interval {lo:+.3f}, {hi:+.3f})"
        else:
            moved = f"not separable from {d['b']} in distance to the subject ({lo:+.3f}, {hi:+.3f})"
        agree = ("class-3 agreement not separable" if d["is3_lo"] <= 0 <= d["is3_hi"] else
                 f"class-3 agreement {'higher' if d['is3_lo'] > 0 else 'lower'} by {abs(d['is3']):.3f}")
        out.append(f"- {d['question']}: {d['a']} is {moved}; {agree} ({_signed(d, 'is3')}).")
    return out


def write_markdown(args, rows, diffs, times):
    header = ["arm", "n", "RMS distance to the subject (lower: like it)", "ink (subject bold)", "classifier reads 3",
              "diversity (mean pairwise RMS)"]
    table = report.markdown_table(header, [[r["arm"], str(r["n"]), _ci(r, "dist"), _ci(r, "ink"), _ci(r, "is3"),
                                            "" if np.isnan(r["div"]) else _ci(r, "div")] for r in rows])
    paired = report.markdown_table(["question", "a - b", "distance", "ink", "reads 3"],
                                   [[d["question"], f"{d['a']} - {d['b']}", _signed(d, "dist"), _signed(d, "ink"),
                                     _signed(d, "is3")] for d in diffs])
    text = (f"# DreamBooth on digits: {args.num} samples per arm, DDIM {args.steps} steps (trailing)\n\n{table}\n\n"
            f"Paired differences (sample i starts from the same noise in every arm; 95% normal intervals):\n\n"
            f"{paired}\n\n" + "\n".join(_verdicts(diffs)) +
            f"\n\nTimes: base training {times['base']:.0f} s, DreamBooth {times['prior']:.0f} s, without the prior "
            f"{times['no prior']:.0f} s, [V] as a copy {times['copy']:.0f} s (a finished run is only loaded), sampling "
            f"{times['sample']:.0f} s.\n")
    atomic_write(os.path.join(args.out, "results.md"), lambda f: f.write(text.encode()))


def write_grid(args, arms, subject):
    n = 10
    rows = [np.concatenate([subject, np.full((n - len(subject), 8, 8, 1), -1.0, np.float32)])]
    rows += [arms[k][:n] for k in ("base: 3", "prior: [V]", "prior: 3", "no prior: [V]", "no prior: 3",
                                   "[V] = copy of 3: [V]", "[V] = copy of 3: 3")]
    viz.save_grid(np.concatenate(rows), os.path.join(args.out, "grid.png"), nrow=n)


if __name__ == "__main__":
    main()
