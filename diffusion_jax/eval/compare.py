"""Sampler comparison on a trained model: every sampler at every NFE, from the same initial noise, scored alike.

    spec = CompareSpec(samplers=("ddpm", "ddim", "ddim:eta=1", "heun", "dpmpp_2m"), nfes=(5, 10, 20, 50), num=1000)
    run_compare("workdirs/digits", spec, "results/compare")    # results.csv/.md, quality_vs_nfe.png, grids/

Fairness: each (sampler, NFE) cell runs the most steps whose network-evaluation count does not exceed the NFE
(`registry.steps_for_nfe`; the exact count is reported); seed s gives every cell the same x_T (common random
numbers, `evaluate.generate`) and the same balanced labels; every cell is scored by the same extractor against the
same held-out reference (`evaluate.Scorer`). Each (cell, seed) result is saved as it finishes (`cells/*.json`, its
features in `cells/*.npz`), so an interrupted comparison resumes.

Intervals. The headline FD of a cell pools its seeds (n = num x seeds samples) and gets a (basic) bootstrap
interval over those samples, resampled within (seed, class) strata; the reference is held fixed, so the interval
is the sampling noise of the cell's own samples. Sample j of every cell starts from the same x_T with the same label,
so two cells are compared on the *same* bootstrap resamples (`metrics.paired`): the paired interval of the FD
difference, with a verdict (better / worse / not separable at 95%) and, where not separable, the n that would be.
The floor (real vs real) is n training images with the same class balance against the same reference.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import viz
from diffusion_jax.config import build_schedule
from diffusion_jax.eval import report
from diffusion_jax.eval.evaluate import Scorer, divergence, generate
from diffusion_jax.eval.report import cell_name
from diffusion_jax.fileio import atomic_write, read_json, write_json
from diffusion_jax.inference.sampling import SamplerSpec
from diffusion_jax.samplers.diffusers_import import (
    check_scheduler_class,
    load_scheduler_config,
    steps_for_nfe_diffusers,
)
from diffusion_jax.samplers.registry import get_sampler, steps_for_nfe

METRICS = ("fd", "kid", "is", "precision", "recall", "class_acc")
LABELS = "balanced"   # class labels of conditional samples: evaluate.balanced_labels (stratified, same in every cell)


DIFFUSERS_PREFIX = "diffusers="


def parse_variant(text: str) -> tuple[str, dict]:
    """'ddim:eta=0.5' -> ("ddim", {"eta": 0.5}); options separated by ':' ('edm:s_churn=40:s_noise=1.003'),
    values Python literals or strings. 'diffusers=PATH' (a diffusers scheduler_config.json, `--scheduler-config`)
    -> ("diffusers", {"scheduler_config": PATH}). The whole text labels the variant in tables and file names."""
    import ast

    if text.startswith(DIFFUSERS_PREFIX):
        path = text[len(DIFFUSERS_PREFIX):]
        check_scheduler_class(load_scheduler_config(path))
        return "diffusers", {"scheduler_config": path}
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
    resamples: int = 200        # bootstrap resamples of every FD interval and paired difference

    def validate(self) -> None:
        if not self.samplers or not self.nfes:
            raise ValueError("compare needs at least one sampler (--samplers) and one NFE (--nfe)")
        for variant in self.samplers:
            parse_variant(variant)
        for n in self.nfes:
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"--nfe values must be ints >= 1, got {n!r}")
        if self.resamples < 20:
            raise ValueError(f"--resamples must be >= 20 (a 95% interval needs its 2.5% tails), got {self.resamples}")
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


def plan(spec: CompareSpec, schedule) -> tuple[list[Cell], list[str]]:
    """The cells to run, and a note for each (sampler, NFE) that cannot run (e.g. PNDM below 13 NFE)."""
    cells, notes = [], []
    for variant in spec.samplers:
        name, options = parse_variant(variant)
        for nfe in spec.nfes:
            try:
                if name == "diffusers":
                    steps, used = steps_for_nfe_diffusers(options["scheduler_config"], nfe)
                else:
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
    if row is not None and row.get("steps") == cell.steps and row.get("context") == context \
            and os.path.exists(path[:-5] + ".npz"):
        return row
    name, options = parse_variant(cell.sampler)
    config = options.pop("scheduler_config", None)           # a diffusers scheduler config sets the rest itself
    sampler = SamplerSpec(name, steps=cell.steps, spacing=spec.spacing, clip_denoised=spec.clip_denoised,
                          options=tuple(sorted(options.items())), guidance_scale=spec.guidance_scale,
                          scheduler_config=config)
    t0 = time.perf_counter()
    raw, labels, nfe = generate(exp, graphdef, params, sampler, num=spec.num, seed=seed,
                                batch_size=spec.batch_size, clip=False)
    seconds = time.perf_counter() - t0
    images = np.clip(raw, -1.0, 1.0)
    feats, probs = scorer.features(images)
    row = {"sampler": cell.sampler, "target_nfe": cell.target_nfe, "nfe": nfe, "steps": cell.steps, "seed": seed,
           "num": spec.num, "spacing": spec.spacing, **scorer.score_features(feats, probs, labels, seed=seed),
           "diverged": divergence(raw)["diverged"], "seconds": seconds, "context": context}
    pred = np.full(len(feats), -1, np.int32) if probs is None else probs.argmax(1).astype(np.int32)
    atomic_write(path[:-5] + ".npz", lambda f: np.savez(
        f, feats=feats.astype(np.float32), pred=pred, labels=np.full(len(feats), -1, np.int32) if labels is None
        else labels))
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
    diverged = {}
    for r in rows:
        diverged[r["sampler"], r["target_nfe"]] = diverged.get((r["sampler"], r["target_nfe"]), 0) + r["diverged"]
    summary = [r | {"diverged": diverged[r["sampler"], r["target_nfe"]]} for r in summary]
    floors = [dict(sampler="real data", seed=s, **scorer.real_floor(spec.num, s)) for s in range(spec.seeds)]
    floor = report.aggregate(floors, ("sampler", "num"), ("fd", "kid", "precision", "recall"))[0]
    pooled = pooled_statistics(out, cells, spec, scorer, spec.resamples)
    summary = [r | pooled["cells"].get((r["sampler"], r["target_nfe"]), {}) for r in summary]
    floor |= pooled["floor"]
    accuracy = getattr(scorer.extractor, "test_accuracy", None)
    if accuracy is not None and exp.model.num_classes is not None:   # the classifier on held-out real images
        floor |= {"class_acc_pooled": float(accuracy), "class_acc_lo": float(accuracy),
                  "class_acc_hi": float(accuracy)}
    title = f"# Sampler comparison: {exp.data.name}, checkpoint step {ckpt_step}"
    paths = write_outputs(out, rows, summary, floor, metrics, spec, title, extractor, notes, pooled["paired"])
    return {"rows": rows, "summary": summary, "floor": floor, "notes": notes, "paired": pooled["paired"],
            "scorer": scorer, **paths}


def _pooled_cell(out: str, cell: Cell, seeds: int):
    """(feats (n, F), labels (n,), correct (n,) bool or None, strata (n,)) of a cell's seeds in order."""
    parts = []
    for s in range(seeds):
        with np.load(os.path.join(out, "cells", f"{cell.name}-seed{s}.npz")) as z:
            parts.append((z["feats"].astype(np.float64), z["labels"], z["pred"]))
    feats = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    pred = np.concatenate([p[2] for p in parts])
    strata = np.concatenate([s * 100000 + np.maximum(p[1], 0) for s, p in enumerate(parts)])
    correct = None if labels.min() < 0 or pred.min() < 0 else pred == labels
    return feats, labels, correct, strata


def pooled_statistics(out: str, cells: list[Cell], spec: CompareSpec, scorer, num_resamples: int = 200) -> dict:
    """Each cell's FD over its pooled seeds with a bootstrap interval ("fd_pooled", "fd_lo", "fd_hi", "fd_half"),
    class agreement with a Wilson interval; the floor likewise; and the paired FD / class-agreement differences of
    every cell against the baseline sampler at the same NFE ("paired" rows with verdicts)."""
    from diffusion_jax.eval.metrics.paired import fd_interval, paired_fd_difference, paired_mean_difference

    mu, sigma = scorer.real_stats
    data, result = {}, {}
    for cell in cells:
        feats, labels, correct, strata = data[cell.name] = _pooled_cell(out, cell, spec.seeds)
        fd = fd_interval(feats, mu, sigma, strata, num_resamples=num_resamples)
        row = {"n_pooled": fd["n"], "fd_pooled": fd["fd"], "fd_lo": fd["lo"], "fd_hi": fd["hi"], "fd_half": fd["half"]}
        if correct is not None:
            lo, hi = report.wilson(int(correct.sum()), len(correct))
            row |= {"class_acc_pooled": float(correct.mean()), "class_acc_lo": lo, "class_acc_hi": hi}
        result[cell.sampler, cell.target_nfe] = row
    n = spec.num * spec.seeds
    floor_feats, floor_labels = scorer.floor_features(min(n, scorer.floor_capacity()), 0)   # distinct images
    floor_strata = np.zeros(len(floor_feats), int) if floor_labels is None else floor_labels
    fd = fd_interval(floor_feats, mu, sigma, floor_strata, num_resamples=num_resamples)
    floor = {"n_pooled": fd["n"], "fd_pooled": fd["fd"], "fd_lo": fd["lo"], "fd_hi": fd["hi"], "fd_half": fd["half"]}
    baseline = _baseline(spec)
    paired = []
    by = {(c.sampler, c.target_nfe): c for c in cells}
    for cell in cells:
        base = by.get((baseline, cell.target_nfe))
        if cell.sampler == baseline or base is None:
            continue
        a, b = data[cell.name], data[base.name]
        d = paired_fd_difference(a[0], b[0], mu, sigma, a[3], num_resamples=num_resamples)
        row = {"sampler": cell.sampler, "baseline": baseline, "target_nfe": cell.target_nfe, "n": n,
               **{f"fd_{k}": v for k, v in d.items() if k != "n"}}
        if a[2] is not None and b[2] is not None:   # class agreement: higher is better, so b - a
            c = paired_mean_difference(b[2].astype(float), a[2].astype(float))
            row |= {"class_acc_diff": -c["diff"], "class_acc_lo": -c["hi"], "class_acc_hi": -c["lo"],
                    "class_acc_verdict": c["verdict"]}
        paired.append(row)
    return {"cells": result, "floor": floor, "paired": paired}


def _baseline(spec: CompareSpec) -> str:
    return "ddim" if "ddim" in spec.samplers else spec.samplers[0]


def write_outputs(out, rows, summary, floor, metrics, spec, title, extractor, notes, paired=()) -> dict:
    """results.csv, summary.csv, paired.csv, results.md, quality_vs_nfe.png, overview.png; `floor` = the real row."""
    from diffusion_jax.eval.compare_plots import plot_overview, plot_quality
    from diffusion_jax.eval.metrics.paired import verdict_text

    flat = [{k: v for k, v in r.items() if k != "context"} for r in rows]
    paths = {"csv": report.write_csv(flat, os.path.join(out, "results.csv")),
             "summary_csv": report.write_csv(summary, os.path.join(out, "summary.csv"))}
    if paired:
        paths["paired_csv"] = report.write_csv(list(paired), os.path.join(out, "paired.csv"))
    nfe_label = lambda n: f"NFE {n}"
    n = spec.num * spec.seeds
    baseline = _baseline(spec)
    text = [title, "",
            f"{spec.num} samples x {spec.seeds} seed(s) = {n} per cell, spacing `{spec.spacing}`, features: "
            f"{extractor}, reference: the held-out real images with every class weighted equally. Every cell asks for "
            "the same balanced labels and starts from the same x_T per seed; the exact NFE of each cell is in "
            "summary.csv (a sampler gets the most steps whose NFE does not exceed the column's).", "",
            f"## Fréchet distance (lower is better; {n} samples pooled over seeds, 95% bootstrap interval)",
            "", report.pivot_markdown([r | {"fd_pooled_ci": r.get("fd_half")} for r in summary], "sampler",
                                      "target_nfe", "fd_pooled", col_label=nfe_label)]
    text[-1] += (f"| *real vs real (floor)* | {report.fmt(floor.get('fd_pooled'), floor.get('fd_half'))} "
                 f"({floor.get('n_pooled')} training images vs the same reference; any NFE) |\n")
    if any("class_acc_pooled" in r for r in summary):
        acc = [r | {"class_acc_pooled_ci": (r["class_acc_hi"] - r["class_acc_lo"]) / 2} for r in summary
               if "class_acc_pooled" in r]
        text += [f"## Class agreement of the classifier with the requested label (higher is better; {n} samples, "
                 "Wilson 95% interval)", "",
                 report.pivot_markdown(acc, "sampler", "target_nfe", "class_acc_pooled", col_label=nfe_label)]
        if "class_acc_pooled" in floor:
            text[-1] += (f"| *real held-out images* | {floor['class_acc_pooled']:.3f} (the classifier's test accuracy: "
                         "the ceiling for samples as recognisable as real digits) |\n")
    if paired:
        cell = lambda r: f"{r['fd_diff']:+.3g} [{r['fd_lo']:+.3g}, {r['fd_hi']:+.3g}] {r['fd_verdict']}"
        table = [r | {"paired": cell(r)} for r in paired]
        text += [f"## Paired: FD minus {baseline}'s on the same samples (same x_T and labels; negative = better than "
                 f"{baseline}; 95% paired bootstrap interval and verdict)", "",
                 report.pivot_markdown(table, "sampler", "target_nfe", "paired", col_label=nfe_label)]
        if any("class_acc_diff" in r for r in paired):
            cell = lambda r: (f"{r['class_acc_diff']:+.3f} [{r['class_acc_lo']:+.3f}, {r['class_acc_hi']:+.3f}] "
                              f"{r['class_acc_verdict']}")
            table = [r | {"paired": cell(r)} for r in paired if "class_acc_diff" in r]
            text += [f"## Paired: class agreement minus {baseline}'s (positive = better than {baseline})", "",
                     report.pivot_markdown(table, "sampler", "target_nfe", "paired", col_label=nfe_label)]
        text += ["## Verdicts (FD, paired, 95%)", ""]
        text += [f"- NFE {r['target_nfe']}: " + verdict_text(
            {k[3:]: v for k, v in r.items() if k.startswith("fd_")} | {"n": r["n"]}, r["sampler"], baseline)
            for r in paired]
        text += [""]
    titles = {"kid": "KID (lower is better)", "precision": "Precision (higher is better)",
              "recall": "Recall (higher is better)", "is": "Inception-style score on the classifier (higher is better)"}
    for m in [m for m in metrics if m in titles]:
        text += [f"## {titles[m]} (mean ± 95% CI over {spec.seeds} seeds of {spec.num})", "",
                 report.pivot_markdown(summary, "sampler", "target_nfe", m, col_label=nfe_label)]
        if m in floor:
            text[-1] += f"| *real data* | {report.fmt(floor[m], floor[m + '_ci'])} (any NFE) |\n"
    text += [f"## Diverged samples (of {n}; more than 1% of the unclipped output outside [-1.5, 1.5])", "",
             report.pivot_markdown(summary, "sampler", "target_nfe", "diverged", col_label=nfe_label)]
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
