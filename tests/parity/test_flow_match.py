"""diffusers' FlowMatch schedulers against ours (samplers/diffusers_flow.py -> samplers/flow.py) on the exact velocity
of a Gaussian mixture under the rectified flow (process/flow.py): every level of the trajectory agrees to 1e-5
relative (diffusers in float64, ours in float32), over shifts, dynamic shifting, shift_terminal, respaced sigmas,
stochastic sampling (same per-step noise) and Heun."""
import functools

import jax
import numpy as np
import pytest
from harness import diffusers_loop, need, patch_randn, to_torch, torch_model

from diffusion_jax.process.flow import RectifiedFlow
from diffusion_jax.samplers.diffusers_import import sampler_from_diffusers
from diffusion_jax.samplers.registry import get_sampler
from diffusion_jax.samplers.wrapper import make_denoiser
from diffusion_jax.testbed import GaussianMixture, process_denoise_fn

pytestmark = pytest.mark.torch
B, D = 4, 6
MIX = GaussianMixture.random(jax.random.key(0), 3, D)
Z = jax.random.normal(jax.random.key(1), (B, D))
KEY = jax.random.key(2)
FLOW = RectifiedFlow()
RTOL = 1e-5
EULER = "FlowMatchEulerDiscreteScheduler"
HEUN = "FlowMatchHeunDiscreteScheduler"
CASES = [  # (class, config, mu)
    (EULER, {}, None), (EULER, {"shift": 3.0}, None), (EULER, {"shift": 3.0, "num_train_timesteps": 500}, None),
    (EULER, {"use_dynamic_shifting": True, "shift": 3.0}, 0.8),                    # Flux: shift ignored, e^mu
    (EULER, {"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.15),
    (EULER, {"shift": 3.0, "shift_terminal": 0.1}, None),
    (EULER, {"shift": 2.0, "use_karras_sigmas": True}, None), (EULER, {"use_exponential_sigmas": True}, None),
    (EULER, {"shift": 3.0, "use_beta_sigmas": True}, None),
    (EULER, {"stochastic_sampling": True, "shift": 3.0}, None),
    (HEUN, {}, None), (HEUN, {"shift": 3.0}, None),
]


@functools.lru_cache(maxsize=None)
def _solver(sampler, options):
    def run(grid, x_T, key):
        den = make_denoiser(process_denoise_fn(MIX, FLOW, "flow"), "flow")
        return get_sampler(sampler, **dict(options))(den, grid, x_T, key, return_trajectory=True)[1]["trajectory"]
    return jax.jit(run)


@pytest.mark.parametrize("cls, cfg, mu", CASES, ids=[f"{c[:-20]}-{'-'.join(f'{k}={v}' for k, v in g.items())}-{m}"
                                                      for c, g, m in CASES])
def test_flow_match_scheduler_matches_diffusers(cls, cfg, mu, monkeypatch):
    _, diffusers = need("torch", "diffusers")
    K = 8
    imp = sampler_from_diffusers({"_class_name": cls, **cfg}, K, mu=mu)
    imp.check_schedule(FLOW, prediction="flow")
    ours = np.asarray(_solver(imp.sampler, tuple(sorted(imp.plan.options.items())))(imp.grid, Z, KEY), np.float64)

    ref = getattr(diffusers, cls).from_config({"_class_name": cls, **cfg})
    ref.set_timesteps(K, **({"mu": mu} if mu is not None else {}))
    if cfg.get("stochastic_sampling"):
        import importlib
        patch_randn(monkeypatch, importlib.import_module(
            "diffusers.schedulers.scheduling_flow_match_euler_discrete"), KEY)
    net = torch_model(process_denoise_fn(MIX, FLOW, "flow"))
    calls = len(ref.timesteps)
    keep = (lambda i: True) if cls == EULER else (lambda i: i % 2 == 1 or i == calls - 1)
    want = np.stack(diffusers_loop(ref, lambda x, t: net(x.float(), t).double(),
                                   to_torch(np.asarray(Z), dtype=np.float64), keep=keep))
    assert ours.shape == want.shape == (K + 1, B, D)
    np.testing.assert_allclose(imp.grid.sigma[:-1] * 1000 * (cfg.get("num_train_timesteps", 1000) / 1000),
                               ref.timesteps[::1 if cls == EULER else 2].numpy(), rtol=1e-6)
    err = np.abs(ours - want).max(axis=(1, 2)) / np.abs(want).max(axis=(1, 2))
    assert err.max() <= RTOL, f"per-level relative error {err}"


def test_flow_match_refusals():
    with pytest.raises(ValueError, match="use_dynamic_shifting=True needs the pipeline's mu"):
        sampler_from_diffusers({"_class_name": EULER, "use_dynamic_shifting": True}, 4)
    with pytest.raises(ValueError, match="invert_sigmas=True .*not supported"):
        sampler_from_diffusers({"_class_name": EULER, "invert_sigmas": True}, 4)
    with pytest.raises(ValueError, match="mu .* applies to the FlowMatch schedulers, not DDIMScheduler"):
        sampler_from_diffusers({"_class_name": "DDIMScheduler"}, 4, mu=0.5)
    imp = sampler_from_diffusers({"_class_name": EULER}, 4)
    with pytest.raises(ValueError, match="runs a flow-matching network"):
        imp.check_schedule(RectifiedFlow(), prediction="eps")
