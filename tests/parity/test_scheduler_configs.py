"""diffusers scheduler configs imported by `sampler_from_diffusers` and sampled as diffusers samples them: a grid of
scheduler classes x timestep spacings x a sample of their options (COMBOS, >= 200), each run by diffusers (its
`from_config`, `set_timesteps` and `step`, x_T scaled by init_noise_sigma) and by us on the exact network of a
Gaussian mixture, from the same z and with the same per-step noise; the final samples agree to 1e-4 relative.

Where diffusers itself cannot run a combination (the entries with `fails`: it raises, or its result is not finite) the
test checks that it still fails and that our sample is finite:
    UniPC, final_sigmas_type "zero" with solver_type "bh1" or lower_order_final false: NaN (B(h) = -h = -inf at the
        clean end, times a zero residual); we step to the clean end with x = alpha x0_hat.
    DPM-Solver multistep / singlestep, algorithm_type "dpmsolver" with final_sigmas_type "zero": a ValueError in
        __init__; our noise-prediction update has a finite limit at sigma = 0 (dpm_solver.py).
"""
import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import (
    brownian_noise_sampler,
    CHEAP_COMPILE,
    diffusers_loop,
    mixture_network,
    need,
    patch_randn,
    rel_err,
    to_torch,
    torch_model,
)

from diffusion_jax.process.discrete import DiscreteSchedule
from diffusion_jax.samplers.diffusers_import import sampler_from_diffusers
from diffusion_jax.samplers.diffusers_levels import betas_from_config
from diffusion_jax.samplers.diffusers_schedulers import SCHEDULERS, Keys
from diffusion_jax.samplers.registry import get_sampler
from diffusion_jax.testbed import GaussianMixture, discrete_denoise_fn, edm_denoiser

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # diffusers' np.log on tensors, 1e4 per run
B, D = 3, 6
MIX = GaussianMixture.random(jax.random.key(0), 3, D)
KEY = jax.random.key(7)
Z = jax.random.normal(jax.random.key(8), (B, 2, 1, 3))   # NCHW for diffusers (its thresholding needs 4-d)
RTOL = 1e-4
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
COS = {"beta_schedule": "squaredcos_cap_v2"}
V = {"prediction_type": "v_prediction"}
SPACE3 = [{"timestep_spacing": s} for s in ("leading", "trailing", "linspace")]
KINDS = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]


def _grid(*axes):
    """Every combination of the option dicts along `axes`, merged."""
    return [functools.reduce(lambda a, b: {**a, **b}, combo, {}) for combo in itertools.product(*axes)]


def _combos():
    c = []
    add = lambda cls, cfgs, K=10, fails=None: c.extend((cls, cfg, K, fails) for cfg in cfgs)
    add("DDIMScheduler", _grid([{"timestep_spacing": "leading"}, {"timestep_spacing": "trailing"}],
                               [{}, {"steps_offset": 1}], [{}, {"set_alpha_to_one": False}], [{}, V, SD],
                               [{"clip_sample": False}, {}]))
    add("DDIMScheduler", _grid([{"thresholding": True, "sample_max_value": 1.5}, {"clip_sample_range": 0.8}],
                               [{}, {"rescale_betas_zero_snr": True, **V, "timestep_spacing": "trailing"}]))
    add("DDPMScheduler", _grid(SPACE3, [{"variance_type": "fixed_small"}, {"variance_type": "fixed_small_log"}],
                               [{}, {"clip_sample": False, **V}]))
    add("DDPMScheduler", _grid([SPACE3[0], SPACE3[2]], [{"variance_type": "fixed_large"}]))
    add("DDPMScheduler", [{"thresholding": True}, {**COS, "clip_sample": False}])
    add("PNDMScheduler", _grid([{"skip_prk_steps": True}, {}], [{}, {"steps_offset": 1}],
                               [{}, {"set_alpha_to_one": True}], [{}, SD]))
    add("PNDMScheduler", [{"skip_prk_steps": True, "timestep_spacing": "trailing"}])
    add("EulerDiscreteScheduler", _grid(SPACE3, KINDS, [{}, {"final_sigmas_type": "sigma_min"}]))
    add("EulerDiscreteScheduler", _grid([{"steps_offset": 1, "timestep_spacing": "leading"}, {}], [V, SD],
                                        [{}, {"interpolation_type": "log_linear"}]))
    add("EulerDiscreteScheduler", [{"timestep_type": "continuous", **V}, {"rescale_betas_zero_snr": True, **V},
                                   {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}])
    add("EulerAncestralDiscreteScheduler", _grid(SPACE3, [{}, V, {"rescale_betas_zero_snr": True, **V}]))
    add("HeunDiscreteScheduler", _grid(SPACE3, KINDS))
    add("HeunDiscreteScheduler", [{"clip_sample": True, "clip_sample_range": 0.9}, V])
    add("LMSDiscreteScheduler", _grid(SPACE3, KINDS))
    add("LMSDiscreteScheduler", [V, SD, {"steps_offset": 1, "timestep_spacing": "leading"}])
    add("KDPM2DiscreteScheduler", _grid(SPACE3, KINDS[:3]))
    add("KDPM2DiscreteScheduler", [V, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}])
    add("KDPM2AncestralDiscreteScheduler", _grid(SPACE3, [{}, {"use_karras_sigmas": True}, V]))
    add("DPMSolverSDEScheduler", _grid(SPACE3, KINDS + [V]))
    add("DPMSolverSDEScheduler", [{"steps_offset": 1, "timestep_spacing": "leading"}, {"noise_sampler_seed": 3}, SD])
    add("DEISMultistepScheduler", _grid([{"solver_order": 1}, {"solver_order": 2}, {"solver_order": 3}], SPACE3))
    add("DEISMultistepScheduler", _grid(KINDS[1:], [{}, {"lower_order_final": False}]))
    add("DEISMultistepScheduler", [V, {"thresholding": True}, {"steps_offset": 1, "timestep_spacing": "leading"}])
    add("DPMSolverMultistepScheduler", _grid(
        [{"solver_order": 1}, {"solver_order": 2}, {"solver_order": 3}], SPACE3,
        [{}, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}]))
    add("DPMSolverMultistepScheduler", _grid(
        [{}, {"algorithm_type": "sde-dpmsolver++"}], KINDS + [{"use_lu_lambdas": True}],
        [{}, {"final_sigmas_type": "sigma_min"}]))
    add("DPMSolverMultistepScheduler", [
        {"solver_type": "heun"}, {"euler_at_final": True}, {"lower_order_final": False}, {"steps_offset": 1,
         "timestep_spacing": "leading"}, {"lambda_min_clipped": -5.1, **COS, "use_karras_sigmas": True},
        {"thresholding": True, "sample_max_value": 1.2}, {"thresholding": True, "algorithm_type": "dpmsolver",
         "final_sigmas_type": "sigma_min"}, {**V, "rescale_betas_zero_snr": True}, {"variance_type": "learned_range"}],
        K=16)
    add("DPMSolverSinglestepScheduler", _grid(
        [{"solver_order": 1}, {"solver_order": 2}, {"solver_order": 3}],
        [{}, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}], [{}, {"use_karras_sigmas": True}]))
    add("DPMSolverSinglestepScheduler", [{"lower_order_final": False, "final_sigmas_type": "sigma_min"},
                                         {"solver_type": "heun"}, {"use_exponential_sigmas": True}, V,
                                         {"thresholding": True}, {"lambda_min_clipped": -5.1, **COS}], K=12)
    add("UniPCMultistepScheduler", _grid(
        [{"solver_order": 1}, {"solver_order": 2}, {"solver_order": 3}], SPACE3,
        [{}, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}]))
    add("UniPCMultistepScheduler", _grid(KINDS, [{}, {"final_sigmas_type": "sigma_min"}]))
    add("UniPCMultistepScheduler", [{"predict_x0": False, "final_sigmas_type": "sigma_min"},
                                    {"disable_corrector": [0, 2]}, V, {"thresholding": True},
                                    {"steps_offset": 1, "timestep_spacing": "leading"}])
    add("EDMEulerScheduler", _grid([{}, {"sigma_schedule": "exponential"}], [{}, {"final_sigmas_type": "sigma_min"}],
                                   [{}, {"sigma_data": 0.7, "sigma_max": 20.0, "rho": 5.0}]))
    add("EDMDPMSolverMultistepScheduler", _grid([{"solver_order": 1}, {"solver_order": 2}, {"solver_order": 3}],
                                                [{}, {"sigma_schedule": "exponential", "final_sigmas_type":
                                                      "sigma_min"}]))
    add("EDMDPMSolverMultistepScheduler", [{"algorithm_type": "sde-dpmsolver++"}, {"solver_type": "heun"},
                                           {"thresholding": True, "sample_max_value": 1.5}, {"euler_at_final": True}])
    add("LCMScheduler", _grid([{}, {"original_inference_steps": 25}, V, {**COS, **V, "timestep_scaling": 3.0}]), K=1)
    add("LCMScheduler", _grid([{}, {"original_inference_steps": 20, "timestep_spacing": "trailing"}, V,
                               {"clip_sample": True, "clip_sample_range": 0.7}, {"thresholding": True},
                               {"rescale_betas_zero_snr": True, **V, "set_alpha_to_one": False}]), K=4)
    add("LCMScheduler", [{}, {"original_inference_steps": 8}], K=8)
    # c_skip(t) is below 1e-5 at LCM's timesteps with timestep_scaling 10: a tiny scaling makes the boundary count
    add("LCMScheduler", _grid([{"timestep_scaling": 0.002}], [{}, V, {"clip_sample": True}]), K=4)
    # what diffusers itself cannot run (and we can: a finite sample)
    add("UniPCMultistepScheduler", [{"lower_order_final": False}, {"solver_type": "bh1"}], fails="not finite")
    add("DPMSolverMultistepScheduler", [{"algorithm_type": "dpmsolver"}], fails="ValueError")
    add("DPMSolverSinglestepScheduler", [{"algorithm_type": "dpmsolver"}], fails="ValueError")
    add("DPMSolverSDEScheduler", [{"prediction_type": "sample"}], fails="NotImplementedError")
    return c


COMBOS = _combos()
IDS = [f"{i}-{cls[:-9]}-{'-'.join(f'{k}={v}' for k, v in cfg.items())}-K{K}"
       for i, (cls, cfg, K, _) in enumerate(COMBOS)]


def _network(prediction, sched, x, t):
    """The exact network: the mixture's prediction at DDPM timestep t, or for "edm" its D(x; sigma = t)."""
    if prediction == "edm":
        return edm_denoiser(MIX)(x, t.reshape((-1,) + (1,) * (x.ndim - 1)))
    return discrete_denoise_fn(MIX, sched, prediction)(x, t)


@functools.lru_cache(maxsize=None)
def _edm_raw_network(sigma_data: float):
    """diffusers' side of an EDM scheduler: the raw F with c_skip x + c_out F(c_in x, c_noise) = D(x; sigma), sigma =
    exp(4 c_noise) (EDM's preconditioning, diffusers' precondition_inputs / _noise / _outputs), jitted."""
    def f(x_in, c_noise):
        sigma = jnp.exp(4.0 * c_noise).reshape((-1,) + (1,) * (x_in.ndim - 1))
        var = sigma ** 2 + sigma_data ** 2
        x = x_in * jnp.sqrt(var)
        d = edm_denoiser(MIX)(x, sigma)
        return (d - sigma_data ** 2 / var * x) / (sigma * sigma_data / jnp.sqrt(var))
    return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _runner(sampler, options_items, prediction, clip, threshold, rederive, learned, K, lcm=None):
    """jit((grid, extra, sched, x_T, key) -> x): our solver on the exact network; one compilation per solver setup."""
    options = dict(options_items)

    def run(grid, extra, sched, x_T, key):
        from diffusion_jax.samplers.consistency import lcm_boundary
        from diffusion_jax.samplers.wrapper import make_denoiser
        den = make_denoiser(functools.partial(_network, prediction, sched), prediction,
                            clip_denoised=clip, threshold=threshold, rederive_eps=rederive)
        den = den if lcm is None else lcm_boundary(den, *lcm)
        return get_sampler(sampler, **options)(den, grid, x_T, key, **extra)[0]
    return jax.jit(run, compiler_options=CHEAP_COMPILE)


def _ours(imp, sched):
    p = imp.plan
    opts = tuple(sorted(p.options.items()))
    run = _runner(p.sampler, opts, p.prediction, p.clip_denoised, p.threshold, p.rederive_eps, p.learned_variance,
                  imp.steps, p.lcm)
    x = run(p.grid, p.extra, sched, Z * p.noise_scale, jax.random.fold_in(KEY, 1))
    return np.asarray(x, np.float64) * p.out_scale


STOCHASTIC_MODULES = {"DDPMScheduler": "scheduling_ddpm",
                      "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
                      "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep",
                      "DPMSolverSinglestepScheduler": "scheduling_dpmsolver_singlestep",
                      "KDPM2AncestralDiscreteScheduler": "scheduling_k_dpm_2_ancestral_discrete",
                      "EDMDPMSolverMultistepScheduler": "scheduling_edm_dpmsolver_multistep",
                      "LCMScheduler": "scheduling_lcm"}
NOISE_FIRST = {"LCMScheduler": 1}      # multistep consistency sampling draws its first noise at step 1


def _float64_tables(ref, cls, cfg):
    """The scheduler with its float32 alphas_cumprod (and what __init__ derives from it) recomputed in float64 from
    the config's betas: a float64 reference, whose fractional timesteps are not moved across an integer (diffusers'
    int64 casts) by float32 rounding of the table."""
    torch = need("torch")
    if cls.startswith("EDM"):
        return ref
    abar = torch.from_numpy(np.cumprod(1.0 - betas_from_config(Keys(cls, cfg, SCHEDULERS[cls].defaults))))
    if cfg.get("rescale_betas_zero_snr") and float(ref.alphas_cumprod[-1]) == 2.0 ** -24:
        abar[-1] = 2.0 ** -24                                  # diffusers' stand-in for abar = 0 in sigma schedulers
    ref.alphas_cumprod = abar
    if hasattr(ref, "final_alpha_cumprod") and not ref.config.set_alpha_to_one:
        ref.final_alpha_cumprod = abar[0]
    if hasattr(ref, "lambda_t"):
        ref.alpha_t, ref.sigma_t = abar.sqrt(), (1 - abar).sqrt()
        ref.lambda_t = ref.alpha_t.log() - ref.sigma_t.log()
    return ref


def _diffusers(cls, cfg, K, sched, prediction, monkeypatch):
    """diffusers' final sample from z (init_noise_sigma z), per-step noise fold_in(fold_in(KEY, 1), i)."""
    diffusers = need("diffusers")
    import importlib
    ref = _float64_tables(getattr(diffusers, cls).from_config({"_class_name": cls, **cfg}), cls, cfg)
    ref.set_timesteps(K)
    if cls in STOCHASTIC_MODULES:
        module = importlib.import_module(f"diffusers.schedulers.{STOCHASTIC_MODULES[cls]}")
        patch_randn(monkeypatch, module, jax.random.fold_in(KEY, 1), first=NOISE_FIRST.get(cls, 0))
    if cls == "DPMSolverSDEScheduler":
        ref.noise_sampler = brownian_noise_sampler(jax.random.fold_in(KEY, 1), Z.shape)
    if prediction == "edm":
        net = torch_model(_edm_raw_network(float(ref.config.sigma_data)))
    else:
        net = torch_model(functools.partial(mixture_network(prediction), MIX, sched))   # jitted once per prediction
    model = lambda x, t: net(x.float(), t).double()          # the reference state in float64
    x_T = to_torch(Z, dtype=np.float64) * ref.init_noise_sigma
    return np.asarray(diffusers_loop(ref, model, x_T, scale_input=True)[-1], np.float64)


@pytest.mark.torch
@pytest.mark.parametrize("cls, cfg, K, fails", COMBOS, ids=IDS)
def test_scheduler_config_matches_diffusers(cls, cfg, K, fails, monkeypatch):
    """Parity, or where diffusers fails (`fails`: how), that it does fail and that our sample is finite."""
    imp = sampler_from_diffusers({"_class_name": cls, **cfg}, K)
    sched = None if cls.startswith("EDM") else DiscreteSchedule.from_betas(
        betas_from_config(Keys(cls, cfg, SCHEDULERS[cls].defaults)))
    ours = _ours(imp, sched)
    assert np.all(np.isfinite(ours)), f"{cls} {cfg}: our sample is not finite"
    if fails is not None:
        errors = {"ValueError": ValueError, "NotImplementedError": NotImplementedError}
        with pytest.raises(errors[fails]) if fails in errors else contextlib.nullcontext():
            want = _diffusers(cls, cfg, K, sched, imp.plan.prediction, monkeypatch)
            assert not np.all(np.isfinite(want)), f"diffusers now runs {cls} {cfg}: move it to the parity grid"
        return
    want = _diffusers(cls, cfg, K, sched, imp.plan.prediction, monkeypatch)
    err = rel_err(ours, want)
    assert err <= RTOL, f"{cls} {cfg} K={K}: relative error {err:.2e}"


def test_grid_has_200_combinations():
    assert len(COMBOS) >= 200, len(COMBOS)
    assert len(set(IDS)) == len(IDS)



@pytest.mark.torch
@pytest.mark.parametrize("cls", sorted(SCHEDULERS))
def test_our_keys_and_defaults_are_diffusers(cls):
    """Every __init__ key of the diffusers class is in our table with diffusers' default (so none is silently
    dropped: the builders read each of them, tests/unit/test_diffusers_config.py), and no other."""
    import inspect
    import math

    diffusers = need("diffusers")
    params = inspect.signature(getattr(diffusers, cls).__init__).parameters
    theirs = {k: p.default for k, p in params.items() if k != "self"}
    ours = SCHEDULERS[cls].defaults
    assert set(ours) == set(theirs), (set(ours) ^ set(theirs))
    for k, v in theirs.items():
        same = (isinstance(v, float) and math.isinf(v) and ours[k] == v) or ours[k] == v
        assert same, (k, ours[k], v)


@pytest.mark.torch
def test_refused_classes_exist_in_diffusers():
    from diffusion_jax.samplers.diffusers_schedulers import REFUSED

    diffusers = need("diffusers")
    assert all(hasattr(diffusers, name) for name in REFUSED if name != "KarrasVeScheduler")
