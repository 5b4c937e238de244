"""Sampler comparison on a trained model: every sampler at every NFE, from the same initial noise, scored alike.

    spec = CompareSpec(samplers=("ddpm", "ddim", "ddim:eta=1", "heun", "dpmpp_2m"), nfes=(5, 10, 20, 50), num=1000)
    run_compare("workdirs/digits", spec, "results/compare")    # results.csv/.md, quality_vs_nfe.png, grids/

Fairness: each (sampler, NFE) cell runs the most steps whose network-evaluation count does not exceed the NFE
(`registry.steps_for_nfe`; the exact count is reported); seed s gives every cell the same x_T (common random
numbers, `evaluate.generate`); every cell is scored by the same extractor against the same real features. Each
(cell, seed) result is saved as it finishes (`cells/*.json`), so an interrupted comparison resumes.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time

import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import report, viz
from diffusion_jax.config import build_schedule
from diffusion_jax.evaluate import Scorer, generate
from diffusion_jax.fileio import read_json, write_json
from diffusion_jax.sampling import SamplerSpec
from diffusion_jax.samplers.registry import get_sampler, steps_for_nfe

METRICS = ("fd", "kid", "is", "precision", "recall", "class_acc")
LABELS = "iid-uniform"   # class labels of conditional samples: evaluate.random_labels (an iid sample, not stratified)


def parse_variant(text: str) -> tuple[str, dict]:
    """'ddim:eta=0.5' -> ("ddim", {"eta": 0.5}); options separated by ':' ('edm:s_churn=40:s_noise=1.003'),
    values Python literals or strings. The whole text labels the variant in tables and file names."""
    import ast

    name, *parts = text.split(":")
    options = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"sampler variant {text!r}: {part!r} must look like OPTION=VALUE (e.g. ddim:eta=0.5)")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    get_sampler(name, **options)                                   # unknown sampler / option -> ValueError
    return name, options


@dataclasses.dataclass(frozen=True)
class CompareSpec:
    """What to compare. samplers: registry names or variants with options, 'ddim:eta=1', 'ddpm:variance=fixed_large'."""
    samplers: tuple[str, ...] = ("ddpm", "ddim", "heun", "dpmpp_2m", "unipc_bh2")
    nfes: tuple[int, ...] = (5, 10, 20, 50, 100)
    num: int = 1000
    seeds: int = 3
    spacing: str = "trailing"
    clip_denoised: float | None = 1.0
    guidance_scale: float = 1.0
    batch_size: int | None = None
    grid_num: int = 100

    def validate(self) -> None:
        if not self.samplers or not self.nfes:
            raise ValueError("compare needs at least one sampler (--samplers) and one NFE (--nfe)")
        for variant in self.samplers:
            parse_variant(variant)
        for n in self.nfes:
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"--nfe values must be ints >= 1, got {n!r}")
        for key in ("num", "seeds"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be >= 1, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class Cell:
    sampler: str          # the variant's label, e.g. "ddim:eta=1"
    target_nfe: int
    steps: int
    nfe: int

    @property
    def name(self) -> str:
        return cell_name(self.sampler, self.target_nfe)


def cell_name(variant: str, target_nfe: int) -> str:
    """A file-name-safe name: 'ddim:eta=1', 10 -> 'ddim_eta=1-nfe10'."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", variant) + f"-nfe{target_nfe}"


def plan(spec: CompareSpec, schedule) -> tuple[list[Cell], list[str]]:
    """The cells to run, and a note for each (sampler, NFE) that cannot run (e.g. PNDM below 13 NFE)."""
    cells, notes = [], []
    for variant in spec.samplers:
        name, options = parse_variant(variant)
        for nfe in spec.nfes:
            try:
                steps, used = steps_for_nfe(name, schedule, nfe, spacing=spec.spacing, options=options)
            except ValueError as e:
                notes.append(f"{variant} at NFE {nfe}: skipped ({e})")
                continue
            cells.append(Cell(variant, nfe, steps, used))
    return cells, notes


def _run_cell(cell, seed, spec, exp, graphdef, params, scorer, out, context: dict) -> dict:
    """One (cell, seed): generate and score, or reuse the saved result if it was made in the same `context`
    (checkpoint step, extractor, spacing, clip, guidance, num, batch size, label protocol) with the same steps."""
    path = os.path.join(out, "cells", f"{cell.name}-seed{seed}.json")
    row = read_json(path)
    if row is not None and row.get("steps") == cell.steps and row.get("context") == context:
        return row
    name, options = parse_variant(cell.sampler)
    sampler = SamplerSpec(name, steps=cell.steps, spacing=spec.spacing, clip_denoised=spec.clip_denoised,
                          options=tuple(sorted(options.items())), guidance_scale=spec.guidance_scale)
    t0 = time.perf_counter()
    images, labels, nfe = generate(exp, graphdef, params, sampler, num=spec.num, seed=seed,
                                   batch_size=spec.batch_size)
    seconds = time.perf_counter() - t0
    row = {"sampler": cell.sampler, "target_nfe": cell.target_nfe, "nfe": nfe, "steps": cell.steps, "seed": seed,
           "num": spec.num, "spacing": spec.spacing, **scorer(images, labels, seed=seed), "seconds": seconds,
           "context": context}
    if seed == 0:
        viz.save_grid(images[:spec.grid_num], os.path.join(out, "grids", f"{cell.name}.png"),
                      nrow=exp.model.num_classes or None)
        np.save(os.path.join(out, "grids", f"{cell.name}-first8.npy"), images[:8])
    write_json(path, row, indent=1)
    return row


def run_compare(workdir: str, spec: CompareSpec, out: str, *, extractor: str = "classifier", step: int | None = None,
                progress: bool = True) -> dict:
    """Runs the comparison and writes its files under `out`; returns {"rows", "summary", "notes", paths...}."""
    from diffusion_jax.train.checkpoint import load_trained

    spec.validate()
    exp, graphdef, params, ckpt_step = load_trained(workdir, step)
    schedule = build_schedule(exp.schedule, params)
    cells, notes = plan(spec, schedule)
    if not cells:
        raise ValueError("no (sampler, NFE) pair can run: " + "; ".join(notes))
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    scorer = Scorer.for_experiment(exp, extractor=extractor, progress=progress)
    rows = []
    bar = tqdm([(c, s) for c in cells for s in range(spec.seeds)], desc="compare", disable=not progress)
    context = {"workdir": os.path.abspath(workdir), "step": ckpt_step, "extractor": extractor, "num": spec.num,
               "spacing": spec.spacing, "clip": spec.clip_denoised, "guidance": spec.guidance_scale,
               "batch_size": spec.batch_size, "labels": LABELS}
    for cell, seed in bar:
        bar.set_postfix_str(f"{cell.sampler} NFE {cell.nfe} seed {seed}")
        rows.append(_run_cell(cell, seed, spec, exp, graphdef, params, scorer, out, context))
    metrics = tuple(m for m in METRICS if any(m in r for r in rows))
    summary = report.aggregate(rows, ("sampler", "target_nfe", "nfe", "steps"), metrics + ("seconds",))
    floors = [dict(sampler="real data", seed=s, **scorer.real_floor(spec.num, s)) for s in range(spec.seeds)]
    floor = report.aggregate(floors, ("sampler", "num"), ("fd", "kid", "precision", "recall"))[0]
    title = f"# Sampler comparison: {exp.data.name}, checkpoint step {ckpt_step}"
    paths = write_outputs(out, rows, summary, floor, metrics, spec, title, extractor, notes)
    return {"rows": rows, "summary": summary, "floor": floor, "notes": notes, **paths}


def paired_differences(rows: list[dict], baseline: str, metric: str = "fd") -> list[dict]:
    """metric[cell, seed] - metric[baseline, same NFE budget, same seed], aggregated over seeds (mean ± 95% CI).

    Cells of one seed share x_T and labels, so most of the seed-to-seed spread (which sample set was drawn) cancels:
    these intervals are far narrower than those of the absolute values."""
    by = {(r["sampler"], r["target_nfe"], r["seed"]): r for r in rows}
    diffs = [{"sampler": r["sampler"], "target_nfe": r["target_nfe"],
              "diff": r[metric] - by[(baseline, r["target_nfe"], r["seed"])][metric]}
             for r in rows if r["sampler"] != baseline and (baseline, r["target_nfe"], r["seed"]) in by]
    return report.aggregate(diffs, ("sampler", "target_nfe"), ("diff",))


def write_outputs(out, rows, summary, floor, metrics, spec, title, extractor, notes) -> dict:
    """results.csv, summary.csv, results.md, quality_vs_nfe.png, overview.png; `floor` = the real-data row."""
    from diffusion_jax.compare_plots import plot_overview, plot_quality

    flat = [{k: v for k, v in r.items() if k != "context"} for r in rows]
    paths = {"csv": report.write_csv(flat, os.path.join(out, "results.csv")),
             "summary_csv": report.write_csv(summary, os.path.join(out, "summary.csv"))}
    nfe_label = lambda n: f"NFE {n}"
    text = [title, "",
            f"{spec.num} samples per cell, {spec.seeds} seed(s) (mean ± 95% CI over seeds), spacing "
            f"`{spec.spacing}`, features: {extractor}. Every cell starts from the same x_T and class labels (iid "
            "uniform) per seed; the exact NFE of each cell is in summary.csv (a sampler gets the most steps whose "
            "NFE does not exceed the column's). *Real data* is the floor: the same metric for "
            f"{floor['num']} real images (an iid subset of the reference set) against the reference set.", ""]
    titles = {"fd": "Fréchet distance (lower is better)", "kid": "KID (lower is better)",
              "class_acc": "Class agreement of the classifier with the requested label (higher is better)",
              "precision": "Precision (higher is better)", "recall": "Recall (higher is better)",
              "is": "Inception-style score on the classifier (higher is better)"}
    for m in metrics:
        text += [f"## {titles[m]}", "", report.pivot_markdown(summary, "sampler", "target_nfe", m, col_label=nfe_label)]
        if m in floor:
            text[-1] += f"| *real data* | {report.fmt(floor[m], floor[m + '_ci'])} (any NFE) |\n"
    baseline = "ddim" if "ddim" in spec.samplers else spec.samplers[0]
    paired = paired_differences(rows, baseline)
    if paired:
        text += [f"## Paired: Fréchet distance minus {baseline}'s at the same NFE and seed (negative: better than "
                 f"{baseline}; the CI is over seeds of the difference)", "",
                 report.pivot_markdown(paired, "sampler", "target_nfe", "diff", col_label=nfe_label)]
    text += ["## Wall seconds per cell and seed (generation; seed 0 includes compiling the sampler)", "",
             report.pivot_markdown(summary, "sampler", "target_nfe", "seconds", col_label=nfe_label)]
    if notes:
        text += ["## Not run", ""] + [f"- {n}" for n in notes] + [""]
    paths["markdown"] = os.path.join(out, "results.md")
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(text))
    paths["plot"] = plot_quality(summary, metrics, os.path.join(out, "quality_vs_nfe.png"), floor=floor)
    paths["overview"] = plot_overview(out, spec, summary, os.path.join(out, "overview.png"))
    paths["grids"] = os.path.join(out, "grids")
    return paths
