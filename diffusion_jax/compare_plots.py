"""The comparison's pictures: quality against NFE (one line per sampler, error bars), and an overview of samples
(rows: samplers, columns: NFE; the same first 8 images of seed 0 in every cell, so the eye compares like with like)."""
from __future__ import annotations

import os

import numpy as np

from diffusion_jax import viz
from diffusion_jax.compare import cell_name

LABELS = {"fd": "Fréchet distance", "kid": "KID", "class_acc": "class agreement", "precision": "precision",
          "recall": "recall", "is": "classifier score (IS)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(summary: list[dict], metrics, path: str, panels=("fd", "kid", "class_acc"), floor=None) -> str:
    """One panel per metric in `panels` that was measured; x = NFE actually used (log), y = mean ± 95% CI;
    `floor` (the real-data row) as a dashed line where it has the metric."""
    plt = _pyplot()
    shown = [m for m in panels if m in metrics]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    for ax, m in zip(axes[0], shown):
        for name in dict.fromkeys(r["sampler"] for r in summary):
            rs = sorted((r for r in summary if r["sampler"] == name), key=lambda r: r["nfe"])
            ci = [0.0 if np.isnan(r[m + "_ci"]) else r[m + "_ci"] for r in rs]
            ax.errorbar([r["nfe"] for r in rs], [r[m] for r in rs], yerr=ci, marker="o", capsize=3, label=name)
        if floor is not None and m in floor and not np.isnan(floor[m]):
            ax.axhline(floor[m], color="gray", ls="--", label=f"real data ({floor['num']})")
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
                ax.set_title(f"NFE {r['nfe']}" + (f", FD {r['fd']:.3g}" if "fd" in r else ""), fontsize=7)
            if j == 0:
                ax.set_ylabel(s, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
