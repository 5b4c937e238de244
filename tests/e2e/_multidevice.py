"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_train.py).

One train step of the tiny U-Net on the same state and batch, on a 1-device mesh, an 8-device data-parallel
mesh, and 8-device FSDP, and of a tiny DiT on the rectified flow on 1 device and 8-device FSDP (the rule is
generic by shape, `parallel.fsdp_spec`: no backbone declares its sharding); then DDPM samples (stochastic, so the
noise must agree too) from the same params and seed on 1 and on 8 devices, and 16 samples whose first 8 must be
those 8. Prints a JSON line with the losses and the largest differences.
"""
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/, for conftest
from conftest import DIGITS, TINY  # noqa: E402

from diffusion_jax import parallel  # noqa: E402
from diffusion_jax.config import load_experiment  # noqa: E402
from diffusion_jax.data import Batches, load_source  # noqa: E402
from diffusion_jax.config import build_schedule  # noqa: E402
from diffusion_jax.process.discrete import make_schedule  # noqa: E402
from diffusion_jax.train.state import StepOptions, create_train_state, make_optimizer, make_train_step, model_graphdef  # noqa: E402


def one_step(exp, num_devices, fsdp):
    mesh = parallel.make_mesh(num_devices)
    parallel.check_divisible(exp.train.batch_size, mesh, "train.batch_size")
    tx, lr = make_optimizer(exp.optim, exp.train.steps)
    graphdef, state, shardings = create_train_state(exp.model, tx, jax.random.PRNGKey(0), mesh, fsdp)
    opts = StepOptions(exp.train.ema_decay, exp.train.ema_warmup, False, exp.model.num_classes)
    step = make_train_step(graphdef, build_schedule(exp.schedule), exp.loss, tx, lr, opts, mesh, shardings)
    batch = Batches(load_source(exp.data), exp.train.batch_size).batch_at(0)
    sharded_specs = sorted({str(s.spec) for s in jax.tree.leaves(shardings)})
    sizes = [(x.size, "data" in str(s.spec)) for x, s in zip(jax.tree.leaves(state.params),
                                                            jax.tree.leaves(shardings.params))]
    for _ in range(2):
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
    sharded = sum(n for n, split in sizes if split) / sum(n for n, _ in sizes)
    return float(metrics["loss"]), jax.device_get(state.params), sharded_specs, sharded


def sample_on(exp, params, graphdef, num_devices, num=8):
    from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn

    shape = (num, exp.data.image_size, exp.data.image_size, exp.model.in_channels)
    fn = make_sample_fn(graphdef, make_schedule("linear", 1000), SamplerSpec("ddpm", steps=4), shape,
                        mesh=parallel.make_mesh(num_devices))
    return np.asarray(fn(params, jax.random.PRNGKey(7))[0])


def main():
    assert jax.device_count() == 8, jax.device_count()
    # One resolution level and no attention: the smallest U-Net that still has every kind of layer sharded.
    exp = load_experiment(DIGITS + ":debug", TINY + ["train.batch_size=16", "optim.warmup_steps=0",
                                                     "model.channel_mult=(1,)", "model.attention_resolutions=()"])[0]
    loss1, params1, _, _ = one_step(exp, 1, False)
    graphdef = model_graphdef(exp.model)
    samples1, samples8 = sample_on(exp, params1, graphdef, 1), sample_on(exp, params1, graphdef, 8)
    samples16 = sample_on(exp, params1, graphdef, 8, num=16)   # image i's noise depends only on i
    loss8, params8, _, _ = one_step(exp, 8, False)
    loss_fsdp, params_fsdp, specs, _ = one_step(exp, 8, True)
    dit = load_experiment(DIGITS + ":debug", [o for o in TINY if not o.startswith("model.")] + [
        "train.batch_size=16", "optim.warmup_steps=0", "model.name=dit", "model.hidden_size=32", "model.depth=2",
        "model.num_heads=2", "model.patch_size=2", "schedule.kind=flow", "loss.prediction=flow",
        "sample.spacing=uniform"])[0]
    loss_dit1, params_dit1, _, _ = one_step(dit, 1, False)
    loss_dit_fsdp, params_dit_fsdp, _, dit_sharded = one_step(dit, 8, True)
    diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    try:
        parallel.check_divisible(12, parallel.make_mesh(8), "train.batch_size")
        batch_error = ""
    except ValueError as e:
        batch_error = str(e)
    print(json.dumps({"loss1": loss1, "loss8": loss8, "loss_fsdp": loss_fsdp,
                      "param_diff_dp": diff(params1, params8), "param_diff_fsdp": diff(params1, params_fsdp),
                      "fsdp_specs": specs, "batch_error": batch_error,
                      "loss_dit1": loss_dit1, "loss_dit_fsdp": loss_dit_fsdp, "dit_sharded_fraction": dit_sharded,
                      "param_diff_dit_fsdp": diff(params_dit1, params_dit_fsdp),
                      "sample_diff": float(np.max(np.abs(samples1 - samples8))),
                      "samples_equal": bool(np.array_equal(samples1, samples8)),
                      "prefix_diff": float(np.max(np.abs(samples16[:8] - samples8)))}))


if __name__ == "__main__":
    main()
