"""Editing grids: inpainting and outpainting (a trained digits U-Net) with several samplers and RePaint, SDEdit
image-to-image at two strengths, and colorization (score_sde's decoupled method) with the exact denoiser of a
colour-patch mixture. Each grid row: original | what the model is given | 3 samples.

    python experiments/editing_grids.py                       # trains workdirs/digits first if it is empty
    python experiments/editing_grids.py --workdir W --out results/editing

Colorization needs a colour model; the digits are gray, so it runs on 16x16 patches of scikit-learn's two bundled
photographs (china.jpg, flower.jpg), with the exact denoiser of a Gaussian kernel density over the training patches
(diffusion_jax.testbed), on held-out patches. Writes OUT/<task>_<sampler>.png and OUT/summary.md (NFE, whether the
known pixels are kept exactly, the gray error of colorization).
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
from diffusion_jax.config import build_schedule, load_experiment  # noqa: E402
from diffusion_jax.data import load_source  # noqa: E402
from diffusion_jax.inference.editing import border_hole, center_hole, edit, edit_fn, half_hole  # noqa: E402
from diffusion_jax.inference.editing.api import check_edit  # noqa: E402
from diffusion_jax.eval.report import markdown_table  # noqa: E402
from diffusion_jax.inference.sampling import SamplerSpec  # noqa: E402
from diffusion_jax.process.discrete import make_schedule  # noqa: E402
from diffusion_jax.testbed import GaussianMixture, discrete_denoise_fn  # noqa: E402
from diffusion_jax.train.checkpoint import load_trained  # noqa: E402
from diffusion_jax.train.loop import train_and_evaluate  # noqa: E402

SAMPLES = 3   # per input image


def rows(orig, shown, samples):
    """Grid rows [original, shown, sample 1..SAMPLES] per input; samples are ordered sample-major."""
    s = samples.reshape(SAMPLES, len(orig), *orig.shape[1:])
    return np.concatenate([np.stack([orig[i], shown[i], *s[:, i]]) for i in range(len(orig))])


def digit_edits(workdir, out, results):
    exp, graphdef, params, step = load_trained(workdir)
    schedule, size = build_schedule(exp.schedule), exp.model.image_size
    test = load_source(dataclasses.replace(exp.data, split="test"))
    x = test.get(np.array([0, 3, 7, 12, 20, 31]))["image"]
    runs = [  # (task, mask, spec, label, extra)
        ("inpaint", center_hole(size), SamplerSpec("ddim", steps=50), "inpaint_ddim50", {}),
        ("inpaint", center_hole(size), SamplerSpec("dpmpp_2m", steps=20, spacing="karras"), "inpaint_dpmpp2m20", {}),
        ("inpaint", half_hole(size, "bottom"), SamplerSpec("heun", steps=15, spacing="karras"), "inpaint_bottom_heun15",
         {}),
        ("inpaint", center_hole(size), SamplerSpec("ddpm", steps=50), "inpaint_repaint50_j5_r5",
         {"method": "repaint", "jump_length": 5, "resamplings": 5}),
        ("outpaint", border_hole(size, size // 4), SamplerSpec("ddim", steps=50), "outpaint_ddim50", {}),
        ("outpaint", border_hole(size, size // 4), SamplerSpec("dpmpp_2m", steps=20, spacing="karras"),
         "outpaint_dpmpp2m20", {}),
        ("img2img", None, SamplerSpec("ddim", steps=50), "img2img_s0.3_ddim50", {"strength": 0.3}),
        ("img2img", None, SamplerSpec("ddim", steps=50), "img2img_s0.6_ddim50", {"strength": 0.6}),
    ]
    for task, mask, spec, label, extra in tqdm(runs, desc="digit edits"):
        img = np.tile(x, (SAMPLES, 1, 1, 1))
        edited, nfe = edit(graphdef, params, schedule, spec, task, img, image_shape=(size, size, 1), mask=mask,
                           num_samples=len(img), num_classes=exp.model.num_classes, seed=0,
                           prediction=exp.loss.prediction, **extra)
        shown = x if mask is None else np.where(mask[None] > 0, x, 0.0)
        exact = "" if mask is None else str(bool(np.array_equal(edited[:, mask[..., 0] > 0], img[:, mask[..., 0] > 0])))
        viz.save_grid(rows(x, shown, edited), os.path.join(out, f"{label}.png"), nrow=2 + SAMPLES)
        results.append({"grid": f"{label}.png", "task": task, "method": extra.get("method", "projection"),
                        "sampler": spec.sampler, "steps": spec.steps, "nfe": nfe, "known pixels exact": exact,
                        "gray error": "", "model": f"{workdir} (step {step})"})


def photo_patches(size=16, scale=4, stride=4):
    """(train, held_out) 16x16 colour patches in [-1, 1] of sklearn's sample photographs (every 7th held out; of
    those, the 6 with the largest pixel std are shown)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    train, held = [], []
    for im in load_sample_images().images:
        small = Image.fromarray(im).resize((im.shape[1] // scale, im.shape[0] // scale), Image.BICUBIC)
        a = np.asarray(small, np.float32) / 127.5 - 1.0
        p = np.stack([a[i:i + size, j:j + size] for i in range(0, a.shape[0] - size + 1, stride)
                      for j in range(0, a.shape[1] - size + 1, stride)])
        held.append(p[1::7])
        train.append(np.delete(p, np.arange(1, len(p), 7), axis=0))
    held = np.concatenate(held)
    held = held[np.argsort(-held.std(axis=(1, 2, 3)))[:6]]   # the most textured held-out patches: more to see
    return np.concatenate(train), held


def colorize(out, results):
    train, held = photo_patches()
    schedule = make_schedule("linear", 1000)
    mixture = GaussianMixture.create(np.ones(len(train)), train.reshape(len(train), -1), 0.08)
    flat = discrete_denoise_fn(mixture, schedule, "eps")
    denoise_fn = lambda x, t: flat(x.reshape(x.shape[0], -1), t).reshape(x.shape)
    gray = np.repeat(held.mean(-1, keepdims=True), 3, -1)
    for spec, label in tqdm([(SamplerSpec("ddim", steps=50, clip_denoised=None), "colorize_ddim50"),
                             (SamplerSpec("dpmpp_2m", steps=20, spacing="karras", clip_denoised=None),
                              "colorize_dpmpp2m20")], desc="colorize"):
        img = np.tile(held, (SAMPLES, 1, 1, 1))
        image, _ = check_edit("colorize", "projection", img, None, None, image_shape=(16, 16, 3),
                              num_samples=len(img), noise="fresh", sampler=spec.sampler)
        run = jax.jit(lambda key: edit_fn(denoise_fn, schedule, spec, "colorize", image, None, key,
                                          num_samples=len(img)))
        edited, nfe = run(jax.random.PRNGKey(0))
        edited = np.asarray(edited)
        error = float(np.abs(edited.mean(-1) - img.mean(-1)).max())
        viz.save_grid(np.clip(rows(held, gray, edited), -1, 1), os.path.join(out, f"{label}.png"), nrow=2 + SAMPLES)
        results.append({"grid": f"{label}.png", "task": "colorize", "method": "projection", "sampler": spec.sampler,
                        "steps": spec.steps, "nfe": int(nfe), "known pixels exact": "",
                        "gray error": f"{error:.1e}", "model": f"exact KDE denoiser, {len(train)} patches"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/digits", help="a trained digits run (trained if empty)")
    parser.add_argument("--config", default="configs/digits.py", help="trains WORKDIR from this if it is empty")
    parser.add_argument("--out", default="results/editing")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        train_and_evaluate(load_experiment(args.config)[0], args.workdir)
    os.makedirs(args.out, exist_ok=True)
    results = []
    digit_edits(args.workdir, args.out, results)
    colorize(args.out, results)
    header = list(results[0])
    table = markdown_table(header, [[r[k] for k in header] for r in results])
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"grids -> {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
