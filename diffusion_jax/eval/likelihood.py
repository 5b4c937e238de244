"""`evaluate_likelihood(workdir, num=...)`: bits/dim of held-out data under a trained run (the `likelihood`
command). The estimators themselves are in `likelihood.py`."""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax.config import build_schedule
from diffusion_jax.data import load_source
from diffusion_jax.eval.evaluate import evaluation_data
from diffusion_jax.fileio import write_json
from diffusion_jax.inference import likelihood as lik
from diffusion_jax.inference.sampling import network_denoise_fn
from diffusion_jax.models.functional import make_apply_fn
from diffusion_jax.train.checkpoint import load_trained


def evaluate_likelihood(workdir: str, *, num: int, split: str | None = None, method: str = "ode",
                        trace: str | None = None, probes: int | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                        batch_size: int | None = None, seed: int = 0, unconditional: bool = False,
                        step: int | None = None, out: str | None = None, progress: bool = True) -> dict:
    """Bits/dim of the first `num` examples of a workdir's data split under its EMA model: PF-ODE (uniformly
    dequantized, `likelihood.ode_bits_per_dim`) or the DDPM VLB (`likelihood.ddpm_vlb`). Writes the result as
    JSON to `out` (default WORKDIR/likelihood_METHOD.json) and returns it (with "out"). Errors name the flag."""

    ode = method == "ode"
    if method not in ("ode", "vlb"):
        raise ValueError(f"--method must be ode or vlb, got {method!r}")
    if not ode and (trace is not None or probes is not None):
        raise ValueError("--trace and --probes apply to --method ode only")
    trace, probes = trace or "rademacher", 1 if probes is None else probes
    if trace not in lik.TRACES:
        raise ValueError(f"--trace must be one of {lik.TRACES}, got {trace!r}")
    for flag, value in (("--num", num), ("--probes", probes), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--rtol", rtol), ("--atol", atol)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a finite number > 0, got {value}")
    exp, graphdef, params, step = load_trained(workdir, step)
    data = evaluation_data(exp.data)   # a run trained on reflow pairs: the data of the run that drew them
    split = split or ("train" if data.name == "folder" else "test")
    try:
        source = load_source(dataclasses.replace(data, split=split))
    except ValueError as e:
        raise ValueError(f"--split {split!r}: {e}") from None
    if num > source.num_examples:
        raise ValueError(f"--num {num} exceeds the {source.num_examples} examples of split {split!r}")
    nc = exp.model.num_classes
    if unconditional and (nc is None or exp.loss.cond_drop_prob <= 0):
        raise ValueError("--unconditional needs a class-conditional model trained with label dropout")
    dim = exp.model.image_size ** 2 * exp.model.in_channels
    if ode and trace == "exact" and dim > lik.EXACT_TRACE_MAX_DIM:
        raise ValueError(f"--trace exact needs {dim} JVPs per evaluation (limit {lik.EXACT_TRACE_MAX_DIM}); "
                         "use --trace rademacher or gaussian")
    schedule = build_schedule(exp.schedule, params)
    discrete = exp.schedule.kind == "discrete"
    if not (ode or discrete):
        raise ValueError(f"--method vlb is the DDPM bound of a discrete schedule; this run has schedule.kind="
                         f"{exp.schedule.kind!r}: use --method ode")
    channels, apply = exp.model.in_channels, make_apply_fn(graphdef)
    variance = "learned" if exp.model.learn_sigma else exp.sample.variance.replace("learned", "fixed_small")
    options = dict(trace=trace, num_probes=probes, rtol=rtol, atol=atol)
    if discrete:   # the last timestep (the one before, with zero terminal SNR, where sigma / alpha is infinite)
        T = schedule.num_timesteps
        options["t_max"] = T - 2 if exp.schedule.zero_terminal_snr else T - 1

    @jax.jit
    def run(params, x, y, key):
        denoise_fn = network_denoise_fn(apply, params, y, channels=channels,
                                        keep_variance=not ode and variance == "learned", schedule=schedule)
        if ode:
            bpd, info = lik.ode_bits_per_dim(denoise_fn, schedule, x, key, prediction=exp.loss.prediction, **options)
            return bpd, info["nfe"], info["success"]
        _, info = lik.ddpm_vlb(denoise_fn, schedule, x, key, prediction=exp.loss.prediction, variance=variance,
                               clip_denoised=exp.sample.clip_denoised or None)
        return info["bpd"], info["nfe"], True

    batch = min(batch_size or 64, num)
    bpd, nfe, ok = [], [], True
    labelled = nc is not None and not unconditional and source.num_classes is not None
    for i, start in enumerate(tqdm(range(0, num, batch), desc="likelihood", disable=not progress)):
        idx = np.minimum(np.arange(start, start + batch), num - 1)       # the last batch padded by repeats
        data = source.get(idx)
        y = None if nc is None else jnp.asarray(data["label"] if labelled else np.full(batch, nc), jnp.int32)
        b, n, s = run(params, jnp.asarray(data["image"]), y, jax.random.fold_in(jax.random.PRNGKey(seed), i))
        keep = min(batch, num - start)
        bpd.extend(np.asarray(b, np.float64)[:keep].tolist())
        nfe.append(int(n))
        ok = ok and bool(s)
    mean, stderr = float(np.mean(bpd)), float(np.std(bpd, ddof=1) / np.sqrt(len(bpd))) if len(bpd) > 1 else 0.0
    result = {"workdir": workdir, "step": step, "split": split, "num": num, "method": method,
              "bpd_mean": mean, "bpd_stderr": stderr, "bpd": bpd, "nfe_mean": float(np.mean(nfe)),
              "seed": seed, "conditioning": "none" if nc is None else ("label" if labelled else "null class"),
              **({"trace": trace, "probes": probes, "rtol": rtol, "atol": atol, "dequantization": "uniform",
                  "solver_success": ok} if ode else {"variance": variance, "decoder": "discretized"})}
    out = out or os.path.join(workdir, f"likelihood_{method}.json")
    write_json(out, result)
    return dict(result, out=out)
