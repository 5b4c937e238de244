"""Reflow (Liu et al. 2023, "Flow straight and fast", sec. 2.3): draw the coupling of a trained model's ODE, then
train a flow on it.

    diffusion-jax reflow --workdir workdirs/flow --out workdirs/flow/pairs.npz --num 20000 --steps 25
    diffusion-jax train --config configs/digits.py --workdir workdirs/reflow2 --config.schedule.kind=flow \\
        --config.loss.prediction=flow --config.data.name=pairs --config.data.data_dir=workdirs/flow/pairs.npz \\
        --config.train.init_from=workdirs/flow

The k-rectified flow's ODE maps noise eps_i to x_i; the (k+1)-rectified flow trains the flow objective on the pairs
(eps_i, x_i) instead of independent draws (`objectives/flow.py` reads batch["noise"]), starting from the k-rectified
flow's weights (train.init_from), as Liu et al. do. Its paths cross less, so they are straighter
(`eval/straightness.py`) and few-step Euler sampling improves. The pairs come from any deterministic sampler of any
trained run whose x_T is standard normal (a flow, or a VP / DDPM model: reflow then distils it into a flow).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from diffusion_jax.data.pairs import save_pairs
from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn, sample_from
from diffusion_jax.samplers.registry import get_entry

UNIT_NOISE_KINDS = ("discrete", "vp", "subvp", "vdm", "flow")   # processes whose x_T is N(0, I)


def draw_pairs(workdir: str, out: str, *, num: int, spec: SamplerSpec, seed: int = 0, batch_size: int = 500,
               step: int | None = None, progress: bool = True) -> dict:
    """Solve the ODE of the run in WORKDIR (EMA params of `step`, default the latest) from `num` standard-normal x_T
    with `spec` (a deterministic sampler; no clipping unless spec says so), and write the pair file OUT
    (`data/pairs.py`): noise, image (the raw float32 solutions), label (balanced, i mod C, for a class-conditional
    model) and meta. Chunk c's noise is fold_in(PRNGKey(seed), c). Returns the meta dict (with "nfe" per sample)."""
    from tqdm.auto import tqdm

    from diffusion_jax.config import build_schedule
    from diffusion_jax.train.checkpoint import load_trained

    if not isinstance(num, int) or num < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"num and batch_size must be ints >= 1, got num={num!r}, batch_size={batch_size!r}")
    spec.validate()
    if spec.scheduler_config is None and get_entry(spec.sampler).stochastic:
        raise ValueError(f"sampler {spec.sampler!r} is stochastic: reflow's pairs are the ODE's map from noise to "
                         "sample; use a deterministic one (flow_heun, flow_euler, dpmpp_2m, ddim, ...)")
    exp, graphdef, params, step = load_trained(workdir, step)
    if exp.schedule.kind not in UNIT_NOISE_KINDS:
        raise ValueError(f"{workdir!r} has schedule.kind={exp.schedule.kind!r}, whose x_T is N(0, sigma_max^2 I), not "
                         f"the flow's N(0, I): reflow pairs come from a run of kind {UNIT_NOISE_KINDS}")
    m = exp.model
    batch = min(batch_size, num)
    shape = (batch, m.image_size, m.image_size, m.in_channels)
    sample = make_sample_fn(graphdef, build_schedule(exp.schedule, params), spec, shape,
                            prediction=exp.loss.prediction, learn_sigma=m.learn_sigma, num_classes=m.num_classes)
    labels = None if m.num_classes is None else (np.arange(num) % m.num_classes).astype(np.int32)   # balanced
    noise = np.concatenate([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), c), shape))
                            for c in range((num + batch - 1) // batch)])[:num]
    images, nfe = [], 0
    for start in tqdm(range(0, num, batch), desc="reflow pairs", disable=not progress):
        y = None if labels is None else labels[start:start + batch]
        x, nfe = sample_from(sample, params, noise[start:start + batch], y, batch=batch, key=jax.random.PRNGKey(seed))
        images.append(x)
    images = np.concatenate(images)
    bad = ~np.isfinite(images.reshape(num, -1)).all(axis=1)
    if bad.any():
        raise FloatingPointError(f"{int(bad.sum())} of {num} solutions from {workdir!r} are not finite (sampler "
                                 f"{spec.sampler!r}, {spec.steps} steps): nothing was written to {out!r}")
    meta = {"workdir": os.path.abspath(workdir), "step": int(step), "sampler": spec.sampler, "steps": spec.steps,
            "spacing": spec.spacing, "clip_denoised": spec.clip_denoised, "guidance_scale": spec.guidance_scale,
            "seed": seed, "num": num, "nfe": int(nfe), "kind": exp.schedule.kind}
    save_pairs(out, noise, images, labels, meta)
    return meta
