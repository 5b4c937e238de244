"""One builder per diffusers scheduler class: its config keys (with diffusers' defaults) and what each does to the
numbers, as one of our solvers on a `Grid` (`diffusers_import.sampler_from_diffusers` is the entry point).

A builder reads the config through `Keys` (every key it reads is "honoured"; a value it cannot honour is refused
with a ValueError naming the key) and returns a `Plan`. Keys of the class that no builder reads are listed in
`Scheduler.neutral` with the reason they change nothing; classes diffusion_jax cannot run are in `REFUSED`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from diffusion_jax.samplers import diffusers_levels as lv
from diffusion_jax.samplers.diffusers_flow import FLOW_SCHEDULERS
from diffusion_jax.samplers.diffusers_keys import Keys, Plan
from diffusion_jax.samplers.wrapper import Threshold

PREDICTIONS = lv.DIFFUSERS_PREDICTIONS


# ------------------------------------------------------------------------------------------------ shared reads
def _prediction(c) -> str:
    return PREDICTIONS[c.choice("prediction_type", tuple(PREDICTIONS))]


def _x0_post(c) -> dict:
    """clip_sample / clip_sample_range and thresholding (Imagen's dynamic thresholding), in the classes with them."""
    out = {}
    if c.get("thresholding", False):
        out["threshold"] = Threshold(c.number("dynamic_thresholding_ratio"), c.number("sample_max_value"))
    else:
        for k in ("dynamic_thresholding_ratio", "sample_max_value"):
            c.get(k)
    if c.get("clip_sample", False) and "threshold" not in out:
        out["clip_denoised"] = c.number("clip_sample_range")
    else:
        c.get("clip_sample_range")
    return out


def _no_flow(c):
    """The flow-matching switches of the VP solvers (their flow sigmas and shifts) are refused: flow models run with
    the FlowMatch schedulers (diffusers_flow.py), or with any of our samplers on schedule.kind='flow'."""
    why = ("(this class's flow-matching sigmas) is not supported; run a flow model with "
           "FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler, or with our samplers on its schedule")
    for key, off in (("use_flow_sigmas", False), ("use_dynamic_shifting", False), ("shift_terminal", None)):
        if key in c.defaults:
            c.only(key, (off,), why)


def _sigma_kind(c) -> str | None:
    kinds = [k for k in lv.SIGMA_KINDS if c.get(f"use_{k}_sigmas", False)]
    if c.get("use_lu_lambdas", False):
        kinds.append("lu")
    if len(kinds) > 1:
        raise ValueError(f"{c.where}only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, "
                         f"use_lu_lambdas may be true, got {kinds}")
    return kinds[0] if kinds else None


def _table(c):
    """(T, abar (T,), s table (T,)) of the config."""
    abar = np.cumprod(1.0 - lv.betas_from_config(c))
    return len(abar), abar, lv.sigma_table(abar)


def _config_range(c) -> dict:
    return {"s_min": c.get("sigma_min"), "s_max": c.get("sigma_max")}


# ------------------------------------------------------------------------------------------ VP schedulers
def _check_landing(c, ts: np.ndarray, T: int, K: int):
    """DDIM and PNDM step from t to t - T // K, not to the next selected timestep: refuse spacings where the two
    differ (diffusion_jax's grids land where the next step evaluates)."""
    landing = ts - T // K
    if not (np.array_equal(landing[:-1], ts[1:]) and landing[-1] < 0):
        raise c.bad("timestep_spacing", f"with {K} steps of {T}: {c.cls} steps from each t to t - {T // K}, which "
                    "is not the next timestep it evaluates; use 'leading' (or a K that divides T with 'trailing')")
    if ts.max() > T - 1 or ts.min() < 0:
        raise c.bad("steps_offset", f"puts timestep {int(ts.max())} outside [0, {T - 1}] with {K} steps")


def ddim(c, K: int) -> Plan:
    T, abar, _ = _table(c)
    ts = lv.select(c.choice("timestep_spacing", lv.SPACINGS), T, K, c.int("steps_offset"))
    _check_landing(c, ts, T, K)
    final = 1.0 if c.flag("set_alpha_to_one") else float(abar[0])
    return Plan("ddim", {}, lv.vp_grid(abar, ts, final), _prediction(c), rederive_eps=False, **_x0_post(c))


DDPM_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                  "learned_range": "learned"}


def ddpm(c, K: int) -> Plan:
    T, abar, _ = _table(c)
    offset = c.int("steps_offset")
    ts = lv.select(c.choice("timestep_spacing", lv.SPACINGS), T, K, offset)
    variance = DDPM_VARIANCES[c.choice("variance_type", tuple(DDPM_VARIANCES))]
    if variance == "fixed_large" and ts[-1] > 0:
        raise c.bad("variance_type", f"with a last timestep {int(ts[-1])} > 0 (steps_offset): DDPMScheduler then adds "
                    "beta noise on its last step, diffusion_jax's ddpm ends noise-free")
    return Plan("ddpm", {"variance": variance}, lv.vp_grid(abar, ts, 1.0), _prediction(c),
                learned_variance=variance == "learned", **_x0_post(c))


def pndm(c, K: int) -> Plan:
    T, abar, _ = _table(c)
    ts = lv.select(c.choice("timestep_spacing", lv.SPACINGS), T, K, c.int("steps_offset"))
    _check_landing(c, ts, T, K)
    c.only("prediction_type", ("epsilon",), "is not supported for PNDMScheduler: diffusers combines raw v outputs "
           "across levels, diffusion_jax combines eps")
    final = 1.0 if c.flag("set_alpha_to_one") else float(abar[0])
    grid = lv.vp_grid(abar, ts, final)
    if c.flag("skip_prk_steps"):
        return Plan("plms", {}, grid, "eps")
    if K < 4:
        raise ValueError(f"{c.where}skip_prk_steps=false (the Runge-Kutta warm-up) needs at least 4 steps, got {K}")
    half = ts[1:4] + (T // K) // 2                  # diffusers' prk_timesteps: t_{i+1} + (T // K) // 2
    return Plan("pndm", {}, grid, "eps", extra={"half_grid": lv.vp_grid(abar, half, 1.0)})


def lcm(c, K: int) -> Plan:
    """LCMScheduler: multistep consistency sampling (`consistency.multistep_consistency`) on K of the
    original_inference_steps timesteps ((1 .. N) T // N - 1, descending, evenly spaced in index), re-noising to each
    next one and returning the last denoised sample (a clean end, abar = 1), with its consistency function
    `consistency.lcm_boundary` (timestep_scaling) applied after clipping."""
    T, abar, _ = _table(c)
    n = c.int("original_inference_steps", lo=1)
    if n > T:
        raise c.bad("original_inference_steps", f"must be at most num_train_timesteps={T}")
    if K > n:
        raise c.bad("original_inference_steps", f"caps LCMScheduler's inference steps (its timesteps are a subset "
                    f"of these), got {K} steps")
    origin = (np.arange(1, n + 1) * (T // n) - 1)[::-1]
    ts = origin[np.floor(np.linspace(0, n, K, endpoint=False)).astype(np.int64)]
    return Plan("consistency", {}, lv.vp_grid(abar, ts, 1.0), _prediction(c), rederive_eps=False,
                lcm=(c.number("timestep_scaling"), 0.5), **_x0_post(c))


# ------------------------------------------------------------------------------------- sigma schedulers (VE)
def _euler_levels(c, K: int, *, kinds: bool = True, final_key: bool = False, round_karras: bool = False):
    """(timesteps (K,), sigmas (K + 1,)) of EulerDiscreteScheduler.set_timesteps and its siblings."""
    T, _, table = _table(c)
    ts = lv.select(c.choice("timestep_spacing", lv.SPACINGS), T, K, c.int("steps_offset"), round_linspace=False)
    interp = "linear"
    if "interpolation_type" in c.defaults:
        interp = c.choice("interpolation_type", ("linear", "log_linear"))
    if interp == "linear":
        sig = np.interp(ts, np.arange(T), table)
    else:                           # diffusers: K + 1 levels from s_max to s_min, and the final level after them
        sig = np.exp(np.linspace(math.log(table[-1]), math.log(table[0]), K + 1))
    kind = _sigma_kind(c) if kinds else None
    s_range = _config_range(c)                      # sigma_min / sigma_max: used by the respaced kinds only
    if kind is not None:
        sig = lv.respace_sigmas(kind, sig, K, **s_range)
        ts = lv.sigma_to_t(sig, table)
        ts = ts.round() if round_karras and kind == "karras" else ts
    last = 0.0
    if final_key and c.choice("final_sigmas_type", ("zero", "sigma_min")) == "sigma_min":
        last = float(table[0])
    continuous = "timestep_type" in c.defaults and c.choice("timestep_type", ("discrete", "continuous")) == "continuous"
    if continuous and c["prediction_type"] == "v_prediction":          # the network gets c_noise = log(s) / 4
        ts = 0.25 * np.log(np.asarray(sig[:K], np.float32).astype(np.float64))
    return ts, np.append(sig, last)


def _ve_plan(c, sampler: str, ts, sig, **extra) -> Plan:
    """The Plan of a sigma scheduler: x_T = init_noise_sigma z in x / alpha coordinates; the result divided by the
    last level's alpha (diffusers returns x / alpha)."""
    grid = lv.ve_grid(ts[: len(sig) - 1], sig[: len(ts) + 1])
    s_max = float(np.max(np.asarray(sig, np.float32)))
    init = s_max if c["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(s_max ** 2 + 1)
    a = np.asarray(grid.alpha, np.float64)
    return Plan(sampler, extra.pop("options", {}), grid, _prediction(c), noise_scale=float(a[0] * init),
                out_scale=float(1.0 / a[-1]), **extra)


def euler(c, K):
    return _ve_plan(c, "euler", *_euler_levels(c, K, final_key=True))


def euler_ancestral(c, K):
    return _ve_plan(c, "euler_ancestral", *_euler_levels(c, K, kinds=False))


def heun(c, K):
    return _ve_plan(c, "heun", *_euler_levels(c, K), **_x0_post(c))


def lms(c, K):
    return _ve_plan(c, "lms", *_euler_levels(c, K))


def _with_midpoints(plan: Plan, c, ancestral: bool = False) -> Plan:
    """plan with the midpoints sqrt(s_i s_down) of its steps (kdpm2_half_grid), their timesteps from the table."""
    from diffusion_jax.process.discrete import DiscreteSchedule
    from diffusion_jax.samplers.kdpm2 import kdpm2_half_grid

    schedule = DiscreteSchedule.from_betas(lv.betas_from_config(c))
    plan.extra = {"half_grid": kdpm2_half_grid(schedule, plan.grid, ancestral=ancestral)}
    return plan


def _kdpm2(c, K, ancestral: bool):
    plan = _ve_plan(c, "kdpm2_ancestral" if ancestral else "kdpm2", *_euler_levels(c, K, round_karras=True))
    return _with_midpoints(plan, c, ancestral)


def dpm_sde(c, K):
    """DPMSolverSDEScheduler: Euler's levels (fractional timesteps), KDPM2's midpoints, Brownian noise (dpm_sde.py)."""
    return _with_midpoints(_ve_plan(c, "dpm_sde", *_euler_levels(c, K)), c)


def kdpm2(c, K):
    return _kdpm2(c, K, ancestral=False)


def kdpm2_ancestral(c, K):
    return _kdpm2(c, K, ancestral=True)


# --------------------------------------------------------------------------- DPM-Solver, UniPC, DEIS (VP, x)
def _dpm_levels(c, K: int, *, karras_last: bool = False, round_kinds=("karras",), cosine_exempt: bool = False,
                final_default: str = "zero"):
    """(integer timesteps (K,), sigmas (K + 1,)) of DPMSolverMultistepScheduler.set_timesteps and its siblings: the
    timesteps of a respaced sigma kind in `round_kinds` are rounded (except on squaredcos_cap_v2 betas with
    cosine_exempt), then all are truncated to integers (diffusers' int64 cast)."""
    T, abar, table = _table(c)
    last = T
    if "lambda_min_clipped" in c.defaults:
        with np.errstate(divide="ignore"):                              # abar = 0 (zero terminal SNR): -inf
            lam = 0.5 * (np.log(abar) - np.log1p(-abar))                 # lambda_t = log alpha_t - log sigma_t
        last = T - int(np.searchsorted(lam[::-1], float(c["lambda_min_clipped"])))
    spacing = c.choice("timestep_spacing", lv.SPACINGS) if "timestep_spacing" in c.defaults else "linspace"
    offset = c.int("steps_offset") if "steps_offset" in c.defaults else 0
    ts = lv.select(spacing, T, K, offset, plus_one=True, last=last)
    kind = _sigma_kind(c)
    s_range = _config_range(c)
    if kind is None:
        sig = np.interp(ts, np.arange(T), table)
    else:
        if kind == "lu":                                  # uniform in lambda = -log s over the whole table
            sig = np.exp(np.linspace(math.log(table[-1]), math.log(table[0]), K))
        else:
            sig = lv.respace_sigmas(kind, table[::-1], K, **s_range)
        ts = lv.sigma_to_t(sig, table)
        if kind in round_kinds and not (cosine_exempt and c["beta_schedule"] == "squaredcos_cap_v2"):
            ts = ts.round()
    final = (c.choice("final_sigmas_type", ("zero", "sigma_min")) if "final_sigmas_type" in c.defaults
             else final_default)
    s_last = 0.0 if final == "zero" else (float(sig[-1]) if karras_last and kind else float(table[0]))
    return np.trunc(ts), np.append(sig, s_last)


def _dpm_algorithm(c) -> tuple[str, int]:
    """(algorithm_type, solver_order) of DPM-Solver, after the keys both DPM-Solver classes refuse."""
    _no_flow(c)
    c.only("variance_type", (None, "learned", "learned_range"), "is not supported; None, 'learned' or "
           "'learned_range' (the variance channels are dropped)")
    algorithm = c.choice("algorithm_type", ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"))
    order = c.int("solver_order", 1)
    if order > 3:
        raise c.bad("solver_order", "must be 1, 2 or 3")
    return algorithm, order


def dpm_multistep(c, K):
    algorithm, order = _dpm_algorithm(c)
    if algorithm == "sde-dpmsolver++" and order == 3:
        raise c.bad("solver_order", "with sde-dpmsolver++: diffusers' third-order SDE step has a sign error "
                    "(its coefficient tends to -alpha_t as h -> 0) that diffusion_jax does not reproduce")
    ts, sig = _dpm_levels(c, K, round_kinds=("karras", "lu"), cosine_exempt=True)
    options = {"order": order, "algorithm": algorithm, "solver_type": c.choice("solver_type", ("midpoint", "heun")),
               "lower_order_final": c.flag("lower_order_final"), "euler_at_final": c.flag("euler_at_final")}
    if order == 3:
        options["diffusers_3m"] = True
    return Plan("dpm_multistep", options, lv.ve_grid(ts, sig), _prediction(c), **_x0_post(c))


def dpm_singlestep(c, K):
    algorithm, order = _dpm_algorithm(c)
    ts, sig = _dpm_levels(c, K)
    lower = c.flag("lower_order_final")
    if not lower and (K % order != 0 or c["final_sigmas_type"] == "zero"):
        lower = True                    # diffusers switches it on (with a warning) in these two cases
    options = {"order": order, "algorithm": algorithm, "solver_type": c.choice("solver_type", ("midpoint", "heun")),
               "lower_order_final": lower}
    return Plan("dpm_singlestep", options, lv.ve_grid(ts, sig), _prediction(c), **_x0_post(c))


def unipc(c, K):
    _no_flow(c)
    c.only("solver_p", (None,), "(a second solver for the predictor) is not supported")
    order = c.int("solver_order", 1)
    ts, sig = _dpm_levels(c, K, karras_last=True)
    options = {"order": order, "predict_x0": c.flag("predict_x0"), "lower_order_final": c.flag("lower_order_final"),
               "disable_corrector": tuple(int(i) for i in c["disable_corrector"])}
    variant = c.choice("solver_type", ("bh1", "bh2"))
    return Plan("unipc_" + variant, options, lv.ve_grid(ts, sig), _prediction(c), **_x0_post(c))


def deis(c, K):
    _no_flow(c)
    c.only("algorithm_type", ("deis",), "is not supported; 'deis'")
    c.only("solver_type", ("logrho",), "is not supported; 'logrho'")
    ts, sig = _dpm_levels(c, K, karras_last=True, final_default="sigma_min")   # DEIS never steps to sigma = 0
    options = {"order": c.int("solver_order", 1), "lower_order_final": c.flag("lower_order_final")}
    return Plan("deis", options, lv.ve_grid(ts, sig), _prediction(c), **_x0_post(c))


# ------------------------------------------------------------------------------------------- EDM schedulers
def _edm_plan(c, K: int, sampler: str, options: dict, *, repeat_last: bool, **extra) -> Plan:
    """EDMEuler / EDMDPMSolverMultistep: K levels between sigma_max and sigma_min (Karras et al. eq. 5 with rho, or
    uniform in log sigma), alpha = 1 (VE), the network's D(x; sigma) read directly (prediction "edm": the project's
    EDM preconditioning, c_noise = log(sigma) / 4, is diffusers' precondition_inputs / _noise / _outputs with
    prediction_type "epsilon"), x_T = sqrt(sigma_max^2 + 1) z (their init_noise_sigma)."""
    s_min, s_max, rho = c.number("sigma_min"), c.number("sigma_max"), c.number("rho")
    if not 0 < s_min < s_max:
        raise c.bad("sigma_min", f"must be in (0, sigma_max={s_max})")
    c.only("prediction_type", ("epsilon",), "is not supported: the project's EDM preconditioning is diffusers' "
           "'epsilon' (c_out > 0)")
    if c.choice("sigma_schedule", ("karras", "exponential")) == "karras":           # EDM eq. 5
        sig = (s_max ** (1 / rho) + np.linspace(0, 1, K) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    else:
        sig = np.exp(np.linspace(math.log(s_min), math.log(s_max), K))[::-1]
    sig = np.asarray(sig, np.float32).astype(np.float64)
    last = 0.0
    if c.choice("final_sigmas_type", ("zero", "sigma_min")) == "sigma_min":
        last = float(sig[-1]) if repeat_last else s_min
    s = np.append(sig, last)
    grid = lv.edm_grid(s)
    return Plan(sampler, options, grid, "edm", noise_scale=math.sqrt(s_max ** 2 + 1),
                edm_sigma_data=c.number("sigma_data"), **extra)


def edm_euler(c, K):
    return _edm_plan(c, K, "euler", {}, repeat_last=True)


def edm_dpm_multistep(c, K):
    algorithm = c.choice("algorithm_type", ("dpmsolver++", "sde-dpmsolver++"))
    order = c.int("solver_order", 1)
    if order > 3 or (algorithm == "sde-dpmsolver++" and order == 3):
        raise c.bad("solver_order", "must be 1, 2 or 3 (1 or 2 with sde-dpmsolver++)")
    options = {"order": order, "algorithm": algorithm, "solver_type": c.choice("solver_type", ("midpoint", "heun")),
               "lower_order_final": c.flag("lower_order_final"), "euler_at_final": c.flag("euler_at_final")}
    if order == 3:
        options["diffusers_3m"] = True
    return _edm_plan(c, K, "dpm_multistep", options, repeat_last=False, **_x0_post(c))


# ------------------------------------------------------------------------------------------------ the table
@dataclasses.dataclass(frozen=True)
class Scheduler:
    build: Callable[[Keys, int], Plan]
    defaults: dict
    neutral: dict = dataclasses.field(default_factory=dict)     # key -> why it changes nothing


_BASE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
         "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0}
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}
_X0 = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_CLIP = {"clip_sample": True, "clip_sample_range": 1.0}
_KINDS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_FLOW = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential"}


_FLOW_NEUTRAL = {"flow_shift": "used only with use_flow_sigmas (refused)",
                 "time_shift_type": "used only with use_dynamic_shifting (refused)"}


def _d(*parts, **extra) -> dict:
    out = {}
    for p in parts:
        out.update(p)
    return {**out, **extra}


SCHEDULERS: dict[str, Scheduler] = {
    "DDIMScheduler": Scheduler(ddim, _d(_BASE, _CLIP, _X0, set_alpha_to_one=True, timestep_spacing="leading",
                                        rescale_betas_zero_snr=False)),
    "DDPMScheduler": Scheduler(ddpm, _d(_BASE, _CLIP, _X0, variance_type="fixed_small", timestep_spacing="leading",
                                        rescale_betas_zero_snr=False)),
    "PNDMScheduler": Scheduler(pndm, _d(_BASE, skip_prk_steps=False, set_alpha_to_one=False,
                                        timestep_spacing="leading")),
    "EulerDiscreteScheduler": Scheduler(euler, _d(_BASE, _KINDS, interpolation_type="linear", sigma_min=None,
                                                  sigma_max=None, timestep_type="discrete",
                                                  rescale_betas_zero_snr=False, final_sigmas_type="zero")),
    "EulerAncestralDiscreteScheduler": Scheduler(euler_ancestral, _d(_BASE, rescale_betas_zero_snr=False)),
    "HeunDiscreteScheduler": Scheduler(heun, _d(_BASE, _SD_BETAS, _KINDS, clip_sample=False, clip_sample_range=1.0)),
    "LMSDiscreteScheduler": Scheduler(lms, _d(_BASE, _KINDS)),
    "KDPM2DiscreteScheduler": Scheduler(kdpm2, _d(_BASE, _SD_BETAS, _KINDS)),
    "KDPM2AncestralDiscreteScheduler": Scheduler(kdpm2_ancestral, _d(_BASE, _SD_BETAS, _KINDS)),
    "DPMSolverSDEScheduler": Scheduler(dpm_sde, _d(_BASE, _SD_BETAS, _KINDS, noise_sampler_seed=None), {
        "noise_sampler_seed": "seeds torchsde's Brownian tree; ours draws the same law from the sampling key"}),
    "DPMSolverMultistepScheduler": Scheduler(dpm_multistep, _d(
        _BASE, _X0, _KINDS, _FLOW, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, euler_at_final=False, use_lu_lambdas=False, final_sigmas_type="zero",
        lambda_min_clipped=-math.inf, variance_type=None, rescale_betas_zero_snr=False), _FLOW_NEUTRAL),
    "DPMSolverSinglestepScheduler": Scheduler(dpm_singlestep, _d(
        {k: v for k, v in _BASE.items() if k not in ("timestep_spacing", "steps_offset")}, _X0, _KINDS, _FLOW,
        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False,
        final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None), _FLOW_NEUTRAL),
    "UniPCMultistepScheduler": Scheduler(unipc, _d(
        _BASE, _X0, _KINDS, _FLOW, solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True,
        disable_corrector=[], solver_p=None, final_sigmas_type="zero", rescale_betas_zero_snr=False,
        sigma_min=None, sigma_max=None, shift_terminal=None), _FLOW_NEUTRAL),
    "DEISMultistepScheduler": Scheduler(deis, _d(
        _BASE, _X0, _KINDS, _FLOW, solver_order=2, algorithm_type="deis", solver_type="logrho",
        lower_order_final=True), _FLOW_NEUTRAL),
}

SCHEDULERS["LCMScheduler"] = Scheduler(lcm, _d(
    _BASE, _SD_BETAS, _CLIP, _X0, beta_schedule="scaled_linear", original_inference_steps=50, clip_sample=False,
    set_alpha_to_one=True, timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False), {
    "set_alpha_to_one": "sets the level after timestep 0, which LCM never steps to (its last step returns the "
                        "denoised sample)",
    "timestep_spacing": "not read by LCMScheduler.set_timesteps (original_inference_steps sets the timesteps)",
    "steps_offset": "not read by LCMScheduler.set_timesteps (original_inference_steps sets the timesteps)"})

_EDM = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "sigma_schedule": "karras",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "rho": 7.0}
SCHEDULERS["EDMEulerScheduler"] = Scheduler(edm_euler, _d(_EDM, final_sigmas_type="zero"),
                                            {"num_train_timesteps": "not used by the EDM schedulers' levels"})
SCHEDULERS["EDMDPMSolverMultistepScheduler"] = Scheduler(edm_dpm_multistep, _d(
    _EDM, _X0, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
    euler_at_final=False, final_sigmas_type="zero"), {"num_train_timesteps": "not used by the EDM schedulers' levels"})

SCHEDULERS.update({name: Scheduler(build, defaults, neutral) for name, (build, defaults, neutral) in
                   FLOW_SCHEDULERS.items()})
REFUSED: dict[str, str] = {
    "TCDScheduler": "(trajectory consistency distillation's strategic stochastic sampling) is not in diffusion_jax; "
                    "LCMScheduler is",
    "KarrasVeScheduler": "was removed from diffusers",
}
