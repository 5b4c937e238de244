"""LoRA vs full fine-tuning of the same U-Net, in one run: step time and memory of the project's jitted train step.

Both sides train the same network on the same batch with the same objective (eps-MSE, AdamW, clipping at 1, EMA):
  full: every parameter trains (optimizer moments and EMA for all of them);
  lora: the base is locked (no weight gradients, no optimizer state: `models/registry.py`'s `trainable` hook) and
        rank-r updates of the attention projections train (`models/lora.py`, the default targets).
Models: digits (configs/digits.py, 8x8, batch 64) and cifar10 (the DDPM CIFAR-10 U-Net, 35.7M params, batch 16).
The two sides alternate: each round times `--steps` steps of full fine-tuning, then of LoRA; the ratio of the two
medians is one sample, and the table gives the median ratio over rounds with its range (the machine is shared).

Memory: XLA's buffer sizes of each compiled step (arguments + temporaries, the donated state aliased to the output)
and the train state's bytes (params, EMA, optimizer state): what LoRA saves is the optimizer moments of the base.

    python benchmarks/lora.py [--models digits,cifar10] [--rounds 3] [--steps 5] [--rank 4] [--batch N]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import parallel  # noqa: E402
from diffusion_jax.config import OptimConfig, load_experiment  # noqa: E402
from diffusion_jax.host import reuse_host_memory  # noqa: E402
from diffusion_jax.models import UNetConfig  # noqa: E402
from diffusion_jax.models.functional import count_params  # noqa: E402
from diffusion_jax.models.lora import LoRAConfig  # noqa: E402
from diffusion_jax.objectives.discrete import LossConfig  # noqa: E402
from diffusion_jax.process.discrete import make_schedule  # noqa: E402
from diffusion_jax.train.state import (  # noqa: E402
    StepOptions,
    create_train_state,
    make_optimizer,
    make_train_step,
    model_graphdef,
    trainable_rule,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = {"digits": 64, "cifar10": 16}


def base_config(name: str) -> UNetConfig:
    if name == "digits":
        return load_experiment(os.path.join(ROOT, "configs", "digits.py"))[0].model
    if name == "cifar10":
        return UNetConfig()
    raise ValueError(f"--models: unknown model {name!r}; available: digits, cifar10")


class Side:
    """One way of fine-tuning: its compiled step, state, batch and sizes."""

    def __init__(self, model_cfg, base: UNetConfig, batch: int):
        mesh = parallel.make_mesh(1)
        tx, lr = make_optimizer(OptimConfig(warmup_steps=0), 1000, model_cfg)
        _, self.state, shardings = create_train_state(model_cfg, tx, jax.random.PRNGKey(0), mesh)
        graphdef = model_graphdef(model_cfg)
        opts = StepOptions(0.999, False, False, base.num_classes, trainable=trainable_rule(model_cfg))
        self.step = make_train_step(graphdef, make_schedule("cosine", 1000), LossConfig(), tx, lr, opts, mesh,
                                    shardings)
        rng = np.random.default_rng(0)
        self.batch = {"image": rng.uniform(-1, 1, (batch, base.image_size, base.image_size, base.in_channels))
                      .astype(np.float32)}
        if base.num_classes is not None:
            self.batch["label"] = rng.integers(0, base.num_classes, batch).astype(np.int32)
        t0 = time.perf_counter()
        stats = self.step.lower(self.state, self.batch).compile().memory_analysis()
        self.compile_s = time.perf_counter() - t0
        self.xla_bytes = stats.argument_size_in_bytes + stats.temp_size_in_bytes
        self.temp_bytes = stats.temp_size_in_bytes
        self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.state))
        params = self.state.params
        rule = trainable_rule(model_cfg)
        self.trained = count_params(params) if rule is None else count_params(params["adapters"])
        self.total = count_params(params) if rule is None else count_params(params["base"])
        self.run(1)   # warm-up

    def run(self, steps: int) -> float:
        """Median seconds per step over `steps` steps."""
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="digits,cifar10")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="batch of every model (default: digits 64, cifar10 16)")
    args = p.parse_args(argv)
    reuse_host_memory()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), rank {args.rank}, "
          f"{args.rounds} rounds x {args.steps} steps")
    rows = []
    for name in args.models.split(","):
        base = dataclasses.replace(base_config(name), dropout=0.0)
        batch = args.batch or BATCH[name]
        full = Side(base, base, batch)
        lora = Side(LoRAConfig(base=base, rank=args.rank, alpha=float(args.rank)), base, batch)
        ratios, t_full, t_lora = [], [], []
        for _ in range(args.rounds):
            a, b = full.run(args.steps), lora.run(args.steps)
            t_full.append(a)
            t_lora.append(b)
            ratios.append(b / a)
        rows.append((name, batch, full, lora, statistics.median(t_full), statistics.median(t_lora), ratios))
    print("\n| model | batch | trained params (LoRA / full) | step s full | step s LoRA | LoRA / full time "
          "(median, range) | train state MB full / LoRA | XLA args+temp MB full / LoRA | compile s full / LoRA |")
    print("|---|---|---|---|---|---|---|---|---|")
    mb = 1 / 2**20
    for name, batch, full, lora, tf, tl, ratios in rows:
        print(f"| {name} | {batch} | {lora.trained:,} / {full.trained:,} ({100 * lora.trained / full.trained:.2f}%) | "
              f"{tf:.4f} | {tl:.4f} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{full.state_bytes * mb:.1f} / {lora.state_bytes * mb:.1f} | "
              f"{full.xla_bytes * mb:.1f} / {lora.xla_bytes * mb:.1f} | {full.compile_s:.1f} / {lora.compile_s:.1f} |")


if __name__ == "__main__":
    main()
