"""The comparison's pictures: quality against NFE (one line per sampler, error bars), and an overview of samples
(rows: samplers, columns: NFE; the same first 8 images of seed 0 in every cell, so the eye compares like with like)."""
from __future__ import annotations

import os

import numpy as np

from diffusion_jax import viz
from diffusion_jax.eval.report import cell_name

LABELS = {"fd": "Fréchet distance", "kid": "KID", "class_acc": "class agreement", "precision": "precision",
          "recall": "recall", "is": "classifier score (IS)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pooled(summary, m):
    """(key of the value, row -> 95% half-width): the pooled-over-seeds value and its interval when the summary has
    it (FD: bootstrap; class agreement: Wilson), else the mean over seeds and its t-interval."""
    if all(m + "_pooled" in r for r in summary):
        if m == "fd":
            return "fd_pooled", lambda r: r["fd_half"]
        return m + "_pooled", lambda r: (r[m + "_hi"] - r[m + "_lo"]) / 2
    return m, lambda r: r[m + "_ci"]


def plot_quality(summary: list[dict], metrics, path: str, panels=("fd", "kid", "class_acc"), floor=None) -> str:
    """One panel per metric in `panels` that was measured; x = NFE actually used (log), y = mean ± 95% CI;
    `floor` (the real-data row) as a dashed line where it has the metric."""
    plt = _pyplot()
    shown = [m for m in panels if m in metrics]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    for ax, m in zip(axes[0], shown):
        value, ci_of = _pooled(summary, m)
        for name in dict.fromkeys(r["sampler"] for r in summary):
            rs = sorted((r for r in summary if r["sampler"] == name), key=lambda r: r["nfe"])
            ci = [0.0 if np.isnan(ci_of(r)) else ci_of(r) for r in rs]
            ax.errorbar([r["nfe"] for r in rs], [r[value] for r in rs], yerr=ci, marker="o", capsize=3, label=name)
        if floor is not None and value in floor and not np.isnan(floor[value]):
            ax.axhline(floor[value], color="gray", ls="--", label=f"real data ({floor.get('n_pooled', floor['num'])})")
        ax.set_xscale("log")
        ticks = sorted({r["nfe"] for r in summary})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        if m == "fd":
            ax.set_yscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(LABELS.get(m, m))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_overview(out: str, spec, summary: list[dict], path: str) -> str:
    """Rows = samplers, columns = NFE; each cell the first 8 samples of seed 0 (2 x 4) with its FD in the title."""
    plt = _pyplot()
    samplers = list(dict.fromkeys(r["sampler"] for r in summary))
    nfes = list(dict.fromkeys(r["target_nfe"] for r in summary))
    fig, axes = plt.subplots(len(samplers), len(nfes), figsize=(2.2 * len(nfes), 1.4 * len(samplers) + 0.4),
                             squeeze=False)
    by = {(r["sampler"], r["target_nfe"]): r for r in summary}
    for i, s in enumerate(samplers):
        for j, n in enumerate(nfes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            f = os.path.join(out, "grids", f"{cell_name(s, n)}-first8.npy")
            if (s, n) in by and os.path.exists(f):
                tile = viz.make_grid(np.load(f), nrow=4)
                ax.imshow(tile.squeeze(-1) if tile.shape[-1] == 1 else tile, cmap="gray", interpolation="nearest")
                r = by[(s, n)]
                fd = r.get("fd_pooled", r.get("fd"))     # the headline table's FD (pooled over seeds)
                ax.set_title(f"NFE {r['nfe']}" + (f", FD {fd:.3g}" if fd is not None else ""), fontsize=7)
            if j == 0:
                ax.set_ylabel(s, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_solver_error(panels: dict, spec, path: str) -> str:
    """Log-log error to the reference vs NFE, one panel per entry of `panels` ({"model": ..., "testbed": ...}, each
    `solver_error.measure`'s result), mean ± 95% CI, with slope -1 and -2 guides through the baseline's first point."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (name, panel) in zip(axes[0], panels.items()):
        for sampler in spec.samplers:
            rs = sorted((r for r in panel["cells"] if r["sampler"] == sampler), key=lambda r: r["nfe"])
            if rs:
                order = next(o for o in panel["orders"] if o["sampler"] == sampler)["order"]
                ax.errorbar([r["nfe"] for r in rs], [r["rms_mean"] for r in rs], yerr=[r["rms_half"] for r in rs],
                            marker="o", capsize=3, label=f"{sampler} (order {order:.2f})")
        base = sorted((r for r in panel["cells"] if r["sampler"] == spec.baseline), key=lambda r: r["nfe"])
        if base:
            n = np.array([base[0]["nfe"], base[-1]["nfe"]], float)
            for p, ls in ((1, ":"), (2, "-.")):
                ax.plot(n, base[0]["rms_mean"] * (n / n[0]) ** -p, color="gray", ls=ls, lw=1, label=f"slope -{p}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({r["nfe"] for r in panel["cells"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel("RMS error to the reference ODE solution")
        ax.set_title({"model": "trained network (reference: adaptive solve)",
                      "testbed": "exact score (Gaussian mixture)"}.get(name, name))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
