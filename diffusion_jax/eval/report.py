"""Results as a reader wants them: CSV rows, a markdown table, mean and 95% confidence interval over seeds.

Every experiment (sampler comparison, sweep, the DDIM table) writes through these, so their files look alike.
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict

import numpy as np


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t confidence interval); half-width NaN for a single value."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (95% for z = 1.96)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def paired_diff(a: np.ndarray, b: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """(mean of a - b, half-width of its normal 95% interval) for paired 0/1 outcomes."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(d.mean()), float(z * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def aggregate(rows: list[dict], by: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """Groups `rows` by the keys `by` (first-seen order) and adds, per metric, `m` (mean), `m_ci` (95% half-width)
    and `n` (rows in the group)."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in by)].append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(by, key), n=len(rs))
        for m in metrics:
            row[m], row[m + "_ci"] = mean_ci([r.get(m) for r in rs])
        out.append(row)
    return out


def write_csv(rows: list[dict], path: str) -> str:
    """All keys of all rows as columns (first-seen order)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def write_table(out: str, name: str, rows: list[dict], table: str) -> None:
    """A benchmark's results: OUT/NAME.csv (rows) and OUT/NAME.md (the markdown table, also printed)."""
    print(table)
    write_csv(rows, os.path.join(out, f"{name}.csv"))
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table + "\n")


def write_results(out: str, rows: list[dict], per_class: list[dict], markdown: str) -> None:
    """OUT/results.csv (rows), OUT/per_class.csv and OUT/results.md (markdown, also printed)."""
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, "results.csv"))
    write_csv(per_class, os.path.join(out, "per_class.csv"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fmt(value, ci=None, digits: int = 3) -> str:
    """'1.23 ± 0.04' (significant digits), '—' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.{digits}g}"
    return text if ci is None or math.isnan(ci) else f"{text} ± {ci:.2g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pivot_markdown(agg: list[dict], row_key: str, col_key: str, metric: str, *, col_label=str) -> str:
    """A paper-style table: one row per `row_key`, one column per `col_key`, cells 'mean ± ci' of `metric`."""
    rows_seen = list(dict.fromkeys(r[row_key] for r in agg))
    cols_seen = list(dict.fromkeys(r[col_key] for r in agg))
    cell = {(r[row_key], r[col_key]): fmt(r[metric], r.get(metric + "_ci")) for r in agg}
    body = [[str(rv)] + [cell.get((rv, cv), "") for cv in cols_seen] for rv in rows_seen]
    return markdown_table([row_key] + [col_label(c) for c in cols_seen], body)


def cell_name(variant: str, target_nfe: int) -> str:
    """A file-name-safe name: 'ddim:eta=1', 10 -> 'ddim_eta=1-nfe10'."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", variant) + f"-nfe{target_nfe}"
