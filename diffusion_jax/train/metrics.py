"""Training metrics: one JSON object per line in WORKDIR/metrics.jsonl, and TensorBoard when available."""
from __future__ import annotations

import json
import os
import time

from diffusion_jax.fileio import atomic_write


class MetricWriter:
    """write(step, {"loss": ..., ...}) appends {"step": step, "time": unix_seconds, ...} to metrics.jsonl
    and, if tensorboardX is installed, scalars under WORKDIR/tensorboard."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl; a last line cut short by a killed process is left out."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(workdir: str, step: int) -> None:
    """Keep the rows up to `step` (the checkpoint a run resumes from): the steps after it are trained and
    logged again, so the file holds each step once. Rewritten atomically; a missing file is left missing."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    rows = [r for r in read_metrics(workdir) if r.get("step", 0) <= step]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows)), binary=False)
