"""Ablation grids: every combination of config values trained (or resumed) in its own workdir, evaluated, and
summarised in ROOT/summary.csv and ROOT/summary.md.

    diffusion-jax sweep --config configs/digits.py --grid 'model.channels=8,16;optim.learning_rate=1e-3,2e-3' \\
        --root workdirs/sweep --num 200 [--config.train.steps=500]

Grid text: axes separated by ';', each `KEY=V1,V2,...`, each value parsed as `--config.KEY=V` would be. Commas
inside brackets do not separate values (`model.channel_mult=(1,2),(1,2,4)`); when a value list contains '|',
'|' alone separates (`model.channel_mult=(1,2)|(1,2,4)`, `data.data_dir=a,b|c`).

Layout: a cell trains in ROOT/<its non-sample keys> (ROOT/base if it has none), so cells that differ only in
`sample.*` keys share one trained model and differ only in evaluation. Each evaluation is saved to
TRAIN_DIR/eval-<hash of sampler spec, num, seed, extractor>.json and is reused while the checkpoint step is
unchanged. Training resumes from the latest checkpoint and is skipped once it has reached train.steps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import time

import numpy as np
from tqdm.auto import tqdm

from diffusion_jax.config import Experiment, apply_overrides, load_config_file
from diffusion_jax.eval import report
from diffusion_jax.fileio import atomic_write, read_json, write_json

METRICS = ("fd", "kid", "kid_std", "is", "precision", "recall", "class_acc", "diverged")
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_OPEN, _CLOSE = "([{", ")]}"


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str                      # e.g. "model.channels=8,optim.learning_rate=0.001" (filesystem-safe)
    overrides: tuple[str, ...]     # the --config overrides, then this cell's grid values
    train_dir: str                 # ROOT/<non-sample keys>, shared by cells that differ only in sample.*
    exp: Experiment
    values: dict = dataclasses.field(default_factory=dict)  # grid key -> the parsed value, as text


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
    """'a.b=1,2;c.d=x' -> [('a.b', ['1', '2']), ('c.d', ['x'])]; ValueError naming the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the grid is empty; expected 'KEY=V1,V2;KEY2=V3,V4' (e.g. optim.learning_rate=1e-3,2e-3)")
    axes = []
    for i, part in enumerate(text.split(";"), 1):
        part = part.strip()
        key, eq, values = (s.strip() for s in part.partition("="))
        if not part:
            raise ValueError(f"grid axis {i} of {text!r} is empty (axes are separated by ';')")
        if not eq or not _KEY.match(key):
            raise ValueError(f"grid axis {part!r} must look like KEY=V1,V2 (e.g. optim.learning_rate=1e-3,2e-3)")
        if key in (k for k, _ in axes):
            raise ValueError(f"grid key {key!r} appears in more than one axis")
        vals = [v.strip() for v in (values.split("|") if "|" in values else _split_commas(values, part))]
        if any(not v for v in vals):
            raise ValueError(f"grid axis {part!r} has an empty value")
        if len(set(vals)) < len(vals):
            raise ValueError(f"grid axis {part!r} repeats a value")
        axes.append((key, vals))
    return axes


def _split_commas(values: str, part: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(values):
        depth += (ch in _OPEN) - (ch in _CLOSE)
        if depth < 0:
            break
        if ch == "," and depth == 0:
            out.append(values[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"grid axis {part!r} has unbalanced brackets")
    return out + [values[start:]]


def _text(value) -> str:
    return "-".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _name(values: dict) -> str:
    name = ",".join(f"{k}={_text(v)}" for k, v in values.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > 200:  # file names stop at 255 bytes; keep it readable and unique
        name = name[:180] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def plan_cells(config_spec: str, grid, overrides=(), root: str = "") -> list[Cell]:
    """The cartesian product of `grid` (text or parse_grid's list), each cell's config loaded and validated
    (so that an error in any cell stops the sweep before anything trains). Names are unique."""
    grid = parse_grid(grid) if isinstance(grid, str) else list(grid)
    base = apply_overrides(load_config_file(config_spec), overrides)  # a bad --config.* is not a cell's fault
    cells, by_name = [], {}
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in grid]):
        grid_overrides = [f"{k}={v}" for k, v in combo]
        try:
            exp = Experiment.from_config(apply_overrides(base, grid_overrides))
        except ValueError as e:
            raise ValueError(f"grid cell {' '.join(grid_overrides)}: {e}") from None
        flat = exp.to_dict()
        values = {k: (flat[k] if "." not in k else flat[k.split(".")[0]][k.split(".", 1)[1]]) for k, _ in combo}
        name = _name(values) or "base"
        if name in by_name:
            raise ValueError(f"grid cells {' '.join(by_name[name])} and {' '.join(grid_overrides)} are the same "
                             f"config ({name})")
        by_name[name] = grid_overrides
        train = _name({k: v for k, v in values.items() if not k.startswith("sample.")}) or "base"
        cells.append(Cell(name, (*overrides, *grid_overrides), os.path.join(root, train), exp,
                          {k: str(v) for k, v in values.items()}))
    return cells


def run_sweep(config_spec: str, grid_text, root: str, *, overrides=(), num: int = 200, seed: int = 0,
              extractor: str = "classifier", progress: bool = True, cache_dir: str | None = None) -> list[dict]:
    """Train (or resume) and evaluate every cell, write ROOT/summary.csv and ROOT/summary.md, print the table.
    Returns the summary rows (grid keys, metrics, loss, nfe, step, train_s)."""
    from diffusion_jax.eval.evaluate import Scorer, divergence, generate
    from diffusion_jax.eval.metrics.reference import check_extractor
    from diffusion_jax.inference.sampling import SamplerSpec
    from diffusion_jax.train.checkpoint import load_trained
    from diffusion_jax.train.loop import train_and_evaluate

    cells = plan_cells(config_spec, grid_text, tuple(overrides), root)
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    specs = {c.name: SamplerSpec.from_config(c.exp.sample) for c in cells}
    for cell in cells:  # everything that can fail without training fails now
        check_extractor(extractor, cell.exp.data.name)
        _check_workdir(cell.train_dir, cell.exp)
        try:
            specs[cell.name].validate()
        except ValueError as e:
            raise ValueError(f"grid cell {cell.name}: {e}") from None
    os.makedirs(root, exist_ok=True)
    scorers, done, skipped, rows, loaded = {}, set(), [], [], (None, None)
    bar = tqdm(cells, desc="sweep", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.name)
        timing_path = os.path.join(cell.train_dir, "sweep-train.json")
        if cell.train_dir not in done:
            done.add(cell.train_dir)
            step = _latest_step(cell.train_dir)
            if step is not None and step >= cell.exp.train.steps:
                tqdm.write(f"{cell.train_dir}: trained to step {step} already, not retrained")
            else:
                t0 = time.perf_counter()
                train_and_evaluate(cell.exp, cell.train_dir, progress=progress)
                seconds = (read_json(timing_path) or {}).get("seconds", 0.0) + time.perf_counter() - t0
                write_json(timing_path, {"seconds": seconds, "step": _latest_step(cell.train_dir)})
        step, spec = _latest_step(cell.train_dir), specs[cell.name]
        settings = {"spec": dataclasses.asdict(spec), "num": num, "seed": seed, "extractor": extractor}
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        path = os.path.join(cell.train_dir, f"eval-{digest}.json")
        record = read_json(path)
        if record is not None and record.get("step") == step:
            skipped.append(cell.name)
            tqdm.write(f"{cell.name}: evaluated at step {step} already ({path}), skipped")
        else:
            if loaded[0] != cell.train_dir:
                loaded = (cell.train_dir, load_trained(cell.train_dir))
            exp, graphdef, params, step = loaded[1]
            d = cell.exp.data
            key = (extractor, d.name, d.image_size, d.split, d.data_dir)
            if key not in scorers:
                scorers[key] = Scorer.for_experiment(cell.exp, extractor=extractor, cache_dir=cache_dir,
                                                     progress=progress)
            t0 = time.perf_counter()
            raw, labels, nfe = generate(exp, graphdef, params, spec, num=num, seed=seed, batch_size=256, clip=False)
            scores = {k: float(v) for k, v in scorers[key](np.clip(raw, -1, 1), labels, seed=seed).items()}
            scores["diverged"] = divergence(raw)["diverged"]
            losses = [r["loss"] for r in _metrics(cell.train_dir) if "loss" in r]
            record = dict(cell=cell.name, values=cell.values, overrides=list(cell.overrides), step=step,
                          **settings, scores=scores, loss=losses[-1] if losses else None, nfe=nfe,
                          train_seconds=(read_json(timing_path) or {}).get("seconds"),
                          eval_seconds=time.perf_counter() - t0)
            write_json(path, record)
        rows.append({**cell.values, **{m: record["scores"].get(m) for m in METRICS}, "loss": record["loss"],
                     "nfe": record["nfe"], "step": record["step"], "train_s": record["train_seconds"]})
    bar.close()
    if not any(r["class_acc"] is not None for r in rows):
        for r in rows:
            del r["class_acc"]
    csv_path = report.write_csv(rows, os.path.join(root, "summary.csv"))
    table = report.markdown_table(list(rows[0]), [[report.fmt(v) for v in r.values()] for r in rows])
    md_path = os.path.join(root, "summary.md")
    text = f"# Sweep `{grid_text}` on `{config_spec}`\n\n{num} samples, seed {seed}, extractor {extractor}\n\n{table}"
    atomic_write(md_path, lambda f: f.write(text), binary=False)
    print(table)
    if skipped:
        print(f"skipped {len(skipped)} of {len(cells)} cell(s), already evaluated: {', '.join(skipped)}")
    print(f"summary -> {csv_path}, {md_path}")
    return rows


def _check_workdir(train_dir: str, exp: Experiment) -> None:
    """A workdir holding a run with another model / schedule / loss would be refused mid-sweep: refuse now."""
    from diffusion_jax.train.loop import frozen_changes

    changed = frozen_changes(train_dir, exp)
    if changed:
        raise ValueError(f"{train_dir} holds a run with different {', '.join(changed)}; use a new --root")


def _latest_step(workdir: str) -> int | None:
    from diffusion_jax.train.checkpoint import Checkpointer

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def _metrics(workdir: str) -> list[dict]:
    from diffusion_jax.train.metrics import read_metrics

    return read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []
