"""Offline text-to-image at CPU scale: does a latent diffusion model conditioned on MiniLM captions draw the class
the prompt names? Fashion-MNIST, captions from class names, the project's KL autoencoder and cross-attention U-Net.

    python experiments/text_to_image_fashion_mnist.py               # full run: ~50 min on 2 CPU cores
    python experiments/text_to_image_fashion_mnist.py --vae-config.train.steps=100 \\
        --config.train.steps=200 --num 10 --steps 20 --out /tmp/t2i --workdir /tmp/ldm --vae-workdir /tmp/vae

1. trains the VAE (configs/vae.py:fashion_mnist) in VAE_WORKDIR unless it is finished there, and reports its
   held-out PSNR (Fashion-MNIST test images, posterior-mean reconstructions);
2. trains configs/latent_fashion_mnist.py:cpu on its latents in WORKDIR (resumed; a finished run is reused);
3. for every class draws --num images for each prompt wording ("a photo of a {}", one of the training templates,
   and "an image showing a {}", a wording never seen in training) at each guidance scale (1 = no guidance),
   image i of every setting from the same initial noise;
4. scores them with the project's clean Fashion-MNIST classifier (`metrics.classifier`, trained on real images
   only) and reports how often it predicts the prompted class (Wilson 95% interval; chance is 0.1), the paired
   difference against w = 1, and per-class rates.

Output in OUT (default results/text_to_image): results.md, results.csv, per_class.csv, grids/<setting>.png (one row
per class), reconstructions.png (the VAE's, held-out originals above reconstructions).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffusion_jax.eval import report  # noqa: E402
from diffusion_jax import viz
from diffusion_jax.config import load_experiment  # noqa: E402
from diffusion_jax.data.sources import FASHION_MNIST_CLASSES  # noqa: E402
from diffusion_jax.fileio import read_json  # noqa: E402
from diffusion_jax.eval.report import paired_diff, wilson  # noqa: E402
from diffusion_jax.inference.sampling import SamplerSpec  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDINGS = {"seen": "a photo of a {}", "unseen": "an image showing a {}"}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae-workdir", default="workdirs/vae_fmnist")
    p.add_argument("--workdir", default="workdirs/ldm_fmnist")
    p.add_argument("--out", default="results/text_to_image")
    p.add_argument("--num", type=int, default=50, help="images per class, prompt wording and guidance scale")
    p.add_argument("--scales", default="1,3", help="classifier-free guidance scales (1 = none)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-cols", type=int, default=10)
    args, extra = p.parse_known_args(argv)
    args.overrides = [e[len("--config."):] for e in extra if e.startswith("--config.")]
    args.vae_overrides = [e[len("--vae-config."):] for e in extra if e.startswith("--vae-config.")]
    unknown = [e for e in extra if not e.startswith(("--config.", "--vae-config."))]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.scales = [float(s) for s in args.scales.split(",")]
    if args.num < 1 or args.batch_size < 1 or 1.0 not in args.scales:
        p.error("--num and --batch-size must be >= 1 and --scales must include 1 (the unguided baseline)")
    return args


def ensure_vae(args) -> dict:
    """Train the VAE unless VAE_WORKDIR holds a finished one; its eval.json."""
    from diffusion_jax.train.vae import load_vae_run, train_vae

    done = os.path.join(args.vae_workdir, "eval.json")
    if os.path.isfile(done) and not args.vae_overrides:
        return read_json(done)
    return train_vae(load_vae_run(os.path.join(ROOT, "configs", "vae.py:fashion_mnist"), args.vae_overrides),
                     args.vae_workdir)


def draw(model, prompt: str, spec, args, bar) -> np.ndarray:
    """args.num images of one prompt; chunk c from seed args.seed + c (the same noise for every setting)."""
    from diffusion_jax.inference.pipelines.stable_diffusion import generate

    out, batch = [], min(args.batch_size, args.num)
    for c, start in enumerate(range(0, args.num, batch)):
        images, _ = generate(model, [prompt] * batch, spec, seed=args.seed + c)
        out.append(images[:args.num - start])
        bar.update(1)
    return np.concatenate(out)


def main(argv=None) -> int:
    from diffusion_jax.eval.metrics.classifier import get_classifier
    from diffusion_jax.train.latent import load_latent_run
    from diffusion_jax.train.loop import train_and_evaluate

    args = parse(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    vae_eval = ensure_vae(args)
    exp, _ = load_experiment(os.path.join(ROOT, "configs", "latent_fashion_mnist.py:cpu"),
                             [f"latent.vae_workdir={args.vae_workdir}", *args.overrides])
    train_and_evaluate(exp, args.workdir)                  # a finished run is reused as it is
    model = load_latent_run(args.workdir)
    clean = get_classifier("fashion_mnist", exp.data.image_size)
    classes = np.arange(10)
    settings = [(wording, w) for wording in WORDINGS for w in args.scales]
    chunks = -(-args.num // min(args.batch_size, args.num))
    bar = tqdm(total=len(settings) * len(classes) * chunks, desc="sampling", unit="chunk")
    rows, per_class, baselines = [], [], {}
    os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)
    for wording, w in settings:
        name = f"{wording} w={w:g}"
        spec = SamplerSpec(args.sampler, args.steps, clip_denoised=None, guidance_scale=w)
        t = time.perf_counter()
        images = np.concatenate([draw(model, WORDINGS[wording].format(FASHION_MNIST_CLASSES[c]), spec, args, bar)
                                 for c in classes])
        labels = np.repeat(classes, args.num)
        probs = clean.probs(images)
        agree = probs.argmax(1) == labels
        baselines.setdefault(wording, agree if w == 1.0 else None)
        lo, hi = wilson(int(agree.sum()), len(agree))
        diff, ci = paired_diff(agree, baselines[wording]) if w != 1.0 else (0.0, 0.0)
        rows.append({"setting": name, "prompt": WORDINGS[wording], "guidance": w, "n": len(agree),
                     "agreement": float(agree.mean()), "ci_low": lo, "ci_high": hi, "diff_vs_w1": diff,
                     "diff_ci": ci, "mean_prob_prompted": float(probs[np.arange(len(labels)), labels].mean()),
                     "seconds": round(time.perf_counter() - t, 1)})
        per_class += [{"setting": name, "class": int(c), "name": FASHION_MNIST_CLASSES[c],
                       "agreement": float(agree[labels == c].mean())} for c in classes]
        shown = np.concatenate([images[labels == c][:args.grid_cols] for c in classes])
        viz.save_grid(shown, os.path.join(args.out, "grids", f"{wording}_w{w:g}.png"),
                      nrow=min(args.grid_cols, args.num))
    bar.close()
    shutil.copy(os.path.join(args.vae_workdir, "reconstructions.png"), os.path.join(args.out, "reconstructions.png"))
    info = {"vae_workdir": args.vae_workdir, "vae_eval": vae_eval, "workdir": args.workdir,
            "diffusion_step": model.configs["step"], "sampler": args.sampler, "steps": args.steps,
            "per_class": args.num, "seed": args.seed, "clean_classifier": clean.name,
            "clean_classifier_test_accuracy": clean.test_accuracy,
            "total_seconds": round(time.perf_counter() - t0, 1)}
    report.write_results(args.out, rows, per_class, markdown(rows, per_class, info))
    print(f"-> {args.out}/results.md, results.csv, per_class.csv, grids/, reconstructions.png")
    return 0


def markdown(rows, per_class, info) -> str:
    header = ["prompt", "guidance w", "agreement (95% CI)", "vs w = 1 (paired 95% CI)", "mean p(prompted)", "s"]
    body = [[f"\"{r['prompt']}\"", f"{r['guidance']:g}", f"{r['agreement']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
             "—" if r["guidance"] == 1.0 else f"{r['diff_vs_w1']:+.3f} ± {r['diff_ci']:.3f}",
             f"{r['mean_prob_prompted']:.3f}", r["seconds"]] for r in rows]
    names = list(dict.fromkeys(p["setting"] for p in per_class))
    cell = {(p["setting"], p["class"]): f"{p['agreement']:.2f}" for p in per_class}
    by_class = [[f"{c} {n}"] + [cell[(m, c)] for m in names] for c, n in enumerate(FASHION_MNIST_CLASSES)]
    vae = info["vae_eval"]
    text = ("# Text-to-image on Fashion-MNIST (latent diffusion, MiniLM captions, CPU scale)\n\n"
            f"VAE: held-out PSNR {vae['psnr']:.2f} dB on {vae['eval_num']} '{vae['eval_split']}' images "
            f"(train {vae['psnr_train']:.2f} dB), scaling factor {vae['scaling_factor']:.4f}.\n\n"
            "Agreement = how often the project's clean-image classifier (test accuracy "
            f"{info['clean_classifier_test_accuracy']:.3f}) predicts the class the prompt names; chance is 0.100. "
            "Same initial noise for every setting (paired).\n\n"
            + report.markdown_table(header, body) + "\n## Per class\n\n"
            + report.markdown_table(["class"] + names, by_class)
            + "\n## Settings\n\n```json\n" + json.dumps(info, indent=1, default=str) + "\n```\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
