"""Per-layer 3x3 convolutions of the CIFAR-10 DDPM U-Net: ours (models/conv.py on XLA:CPU) vs PyTorch, one run.

    python benchmarks/convs.py [--batch 16] [--repeats 7] [--torch-threads 2] [--out results/bench]

For each (resolution, C_in, C_out) of the U-Net's 3x3 convs: the forward pass, the input gradient and the kernel
gradient of ours, each jitted alone (median of --repeats calls), against PyTorch's forward and backward (input and
kernel gradient together; torch has no separate call for each). Shows which layers hold the train step's gap to
PyTorch (docs/benchmarks.md). Writes OUT/convs.csv and OUT/convs.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.host import reuse_host_memory  # noqa: E402

# (H = W, C_in, C_out) of the DDPM CIFAR-10 U-Net's 3x3 convs (ch 128, mult 1, 2, 2, 2), the up path's
# concatenated skips included
LAYERS = [(32, 128, 128), (32, 256, 128), (32, 384, 128), (16, 128, 256), (16, 256, 256), (16, 384, 256),
          (16, 512, 256), (8, 256, 256), (8, 512, 256), (4, 256, 256), (4, 512, 256)]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_layer(batch: int, size: int, cin: int, cout: int, repeats: int) -> dict:
    import jax
    import numpy as np
    import torch

    from diffusion_jax.models.conv import conv2d

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, cin), np.float32)
    w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    dy = rng.standard_normal((batch, size, size, cout), np.float32)
    conv = lambda x, w: conv2d(x, w, (1, 1), ((1, 1), (1, 1)))   # noqa: E731
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
    dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
    x, w, dy = jax.device_put(x), jax.device_put(w), jax.device_put(dy)
    row = {"size": size, "c_in": cin, "c_out": cout, "batch": batch,
           "ours_fwd_ms": _median_ms(lambda: fwd(x, w).block_until_ready(), repeats),
           "ours_dx_ms": _median_ms(lambda: dx(x, w, dy).block_until_ready(), repeats),
           "ours_dw_ms": _median_ms(lambda: dw(x, w, dy).block_until_ready(), repeats)}
    tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous().requires_grad_()
    tw = torch.tensor(np.asarray(w)).permute(3, 2, 0, 1).contiguous().requires_grad_()
    tdy = torch.tensor(np.asarray(dy)).permute(0, 3, 1, 2).contiguous()

    def fwd_bwd():
        tx.grad = tw.grad = None
        torch.nn.functional.conv2d(tx, tw, padding=1).backward(tdy)

    with torch.no_grad():
        row["torch_fwd_ms"] = _median_ms(lambda: torch.nn.functional.conv2d(tx, tw, padding=1), repeats)
    row["torch_bwd_ms"] = _median_ms(fwd_bwd, repeats) - row["torch_fwd_ms"]
    row["ours_total_ms"] = row["ours_fwd_ms"] + row["ours_dx_ms"] + row["ours_dw_ms"]
    row["torch_total_ms"] = row["torch_fwd_ms"] + row["torch_bwd_ms"]
    row["ratio"] = row["torch_total_ms"] / row["ours_total_ms"]
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| H=W | C_in -> C_out | ours fwd | ours dL/dx | ours dL/dW | ours total | PyTorch fwd | PyTorch bwd | "
             "PyTorch total | PyTorch / ours |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['c_in']} -> {r['c_out']} | {r['ours_fwd_ms']:.1f} | {r['ours_dx_ms']:.1f} | "
                     f"{r['ours_dw_ms']:.1f} | {r['ours_total_ms']:.1f} | {r['torch_fwd_ms']:.1f} | "
                     f"{r['torch_bwd_ms']:.1f} | {r['torch_total_ms']:.1f} | **{r['ratio']:.2f}x** |")
    return "\n".join(lines) + "\n\nTimes in ms (median); batch " + str(rows[0]["batch"]) + ", float32, NHWC (ours), NCHW (PyTorch)."


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's own choice")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")
    reuse_host_memory()   # before JAX's CPU backend and torch start (diffusion_jax/host.py)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rows = []
    for size, cin, cout in LAYERS:
        rows.append(time_layer(args.batch, size, cin, cout, args.repeats))
        print(markdown(rows[-1:]).splitlines()[2], flush=True)
    from diffusion_jax.eval.report import write_table

    write_table(args.out, "convs", rows, markdown(rows))
    return rows


if __name__ == "__main__":
    main()
