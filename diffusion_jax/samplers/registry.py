"""Samplers by name: the one lookup, used only at the config / command-line boundary.

    x, info = run_sampler("dpmpp_2m", denoise_fn, schedule, key, shape, steps=20, spacing="karras")

Every sampler is one convention: `solver(denoiser, grid, x_T, key, **options) -> (x_0, info)`. `run_sampler`
builds the noise-level `Grid` from the process, the `Denoiser` from the network's parameterization (with
classifier-free guidance when asked), draws x_T from fold_in(key, 0) and gives the solver fold_in(key, 1) for its
own noise. A solver that needs more of the process than its grid declares it in its registry line (`from_process`:
PNDM's half levels, the reverse SDE of Euler-Maruyama and predictor-corrector); `run_sampler` has no name cases.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import validate
from diffusion_jax.process import check_process
from diffusion_jax.samplers import (adaptive, ddim, ddpm, deis, dpm_sde, dpm_solver, euler, flow, kdpm2, lms, pndm,
                                   sde_solvers, unipc)
from diffusion_jax.samplers.checks import check_key
from diffusion_jax.samplers.consistency import multistep_consistency
from diffusion_jax.samplers.grid import continuous_grid, discrete_grid
from diffusion_jax.samplers.wrapper import Guidance, make_denoiser


@dataclasses.dataclass(frozen=True)
class Entry:
    fn: Callable
    fixed: dict            # options the name fixes (e.g. order=2)
    stochastic: bool
    about: str
    from_process: Callable | None = None   # (process, grid) -> options the solver takes from the process


def _e(fn, about, stochastic=False, from_process=None, **fixed):
    return Entry(fn, fixed, stochastic, about, from_process)


SAMPLERS: dict[str, Entry] = {
    "ddpm": _e(ddpm.ddpm, "DDPM ancestral (Ho et al. 2020), fixed_small / fixed_large / learned variance", True),
    "ddim": _e(ddim.ddim, "DDIM (Song et al. 2021), eta = 0 deterministic, eta > 0 stochastic"),
    "euler": _e(euler.euler, "Euler on the probability-flow ODE (EDM coordinates)"),
    "heun": _e(euler.heun, "Heun, EDM Algorithm 1 (2nd order)"),
    "edm": _e(euler.edm_sampler, "EDM stochastic sampler, Algorithm 2 (s_churn, s_tmin, s_tmax, s_noise)", True),
    "euler_ancestral": _e(euler.euler_ancestral, "Euler ancestral (k-diffusion / diffusers)", True),
    "plms": _e(pndm.plms, "PLMS: pseudo linear multistep (Liu et al. 2022)"),
    "pndm": _e(pndm.pndm, "PNDM with the pseudo Runge-Kutta warm-up (Liu et al. 2022)",
               from_process=pndm.prk_options, warmup="prk"),
    "dpm_solver_1": _e(dpm_solver.dpm_solver_singlestep, "DPM-Solver-1 (Lu et al. 2022a)", order=1,
                       algorithm="dpmsolver"),
    "dpm_solver_2": _e(dpm_solver.dpm_solver_singlestep, "DPM-Solver-2 singlestep", order=2, algorithm="dpmsolver"),
    "dpm_solver_3": _e(dpm_solver.dpm_solver_singlestep, "DPM-Solver-3 singlestep", order=3, algorithm="dpmsolver"),
    "dpmpp_2s": _e(dpm_solver.dpm_solver_singlestep, "DPM-Solver++(2S) singlestep", order=2),
    "dpmpp_2m": _e(dpm_solver.dpm_solver_multistep, "DPM-Solver++(2M) multistep (Lu et al. 2022b)", order=2),
    "dpmpp_3m": _e(dpm_solver.dpm_solver_multistep, "DPM-Solver++(3M) multistep", order=3),
    "dpmpp_2m_sde": _e(dpm_solver.dpm_solver_multistep, "SDE-DPM-Solver++(2M)", True, order=2,
                       algorithm="sde-dpmsolver++"),
    "dpm_multistep": _e(dpm_solver.dpm_solver_multistep, "DPM-Solver(++) multistep, any order / algorithm "
                        "(diffusers' DPMSolverMultistepScheduler options)", True),
    "dpm_singlestep": _e(dpm_solver.dpm_solver_singlestep, "DPM-Solver(++) singlestep, any order / algorithm "
                         "(diffusers' DPMSolverSinglestepScheduler options)", True),
    "unipc_bh1": _e(unipc.unipc, "UniPC with B(h) = h (Zhao et al. 2023)", variant="bh1"),
    "unipc_bh2": _e(unipc.unipc, "UniPC with B(h) = e^h - 1", variant="bh2"),
    "lms": _e(lms.lms, "LMS: linear multistep in sigma (k-diffusion / diffusers' LMSDiscreteScheduler), order 1-4"),
    "kdpm2": _e(kdpm2.kdpm2, "KDPM2: DPM-Solver-2 with the midpoint in log sigma (k-diffusion / diffusers)",
                from_process=kdpm2.kdpm2_options),
    "kdpm2_ancestral": _e(kdpm2.kdpm2_ancestral, "KDPM2 ancestral (k-diffusion / diffusers)", True,
                          from_process=kdpm2.kdpm2_ancestral_options),
    "flow_euler": _e(flow.flow_euler, "Euler on the velocity ODE dz/dtau = eps - x0 (flow matching; FlowMatchEuler)"),
    "flow_heun": _e(flow.flow_heun, "Heun on the velocity ODE (FlowMatchHeun), Euler to the clean end"),
    "flow_midpoint": _e(flow.flow_midpoint, "the explicit midpoint method on the velocity ODE", from_process=
                        flow.flow_midpoint_options),
    "dpm_sde": _e(dpm_sde.dpm_solver_sde, "DPM-Solver-SDE: ancestral midpoint steps, Brownian noise (diffusers)", True,
                  from_process=dpm_sde.dpm_sde_options),
    "deis": _e(deis.deis, "DEIS multistep, log-rho AB (Zhang & Chen 2023; diffusers' DEISMultistepScheduler), "
                          "order 1-3"),
    "euler_maruyama": _e(sde_solvers.euler_maruyama, "Euler-Maruyama on the reverse SDE (Song et al. 2021)", True,
                         from_process=sde_solvers.sde_options),
    "pc": _e(sde_solvers.predictor_corrector, "score_sde predictor-corrector (Langevin corrector)", True,
             from_process=sde_solvers.sde_options),
    "consistency": _e(multistep_consistency, "multistep consistency sampling (Song et al. 2023, Alg. "
                      "1): x0_hat, then fresh noise to the next level; 1 NFE per level", True),
    "adaptive": _e(adaptive.adaptive_ode, "adaptive PF-ODE (diffrax Tsit5 / Dopri5, rtol / atol)"),
}
_BUILT_IN = {"denoiser", "grid", "x_T", "key", "denoise_fn", "schedule", "shape", "steps", "prediction",
             "spacing", "clip_denoised", "return_trajectory", "half_grid"}


def _traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def sampler_options(name: str) -> list[str]:
    """The options a sampler takes beyond the common ones (steps, spacing, prediction, ...)."""
    entry = get_entry(name)
    params = inspect.signature(entry.fn).parameters
    return sorted(p for p in params if p not in _BUILT_IN and p not in entry.fixed)


def get_entry(name: str) -> Entry:
    if name not in SAMPLERS:
        raise ValueError(f"sampler.name={name!r} is unknown; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def get_sampler(name: str, **options) -> Callable:
    """The solver function with its name's fixed options and `options` bound; unknown options are refused."""
    entry = get_entry(name)
    allowed = sampler_options(name)
    for key in options:
        if key not in allowed:
            raise ValueError(f"sampler {name!r} has no option {key!r}; its options are {allowed}")
    return functools.partial(entry.fn, **entry.fixed, **options)


def _check_x_T(x_T, shape: tuple[int, ...]):
    """x_T as an array: float, of the `shape` given to run_sampler, finite when concrete."""
    form = f"{shape} float (the shape argument)"
    x_T = validate.as_array(x_T, "x_T", form)
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise TypeError(f"x_T must be {form}, got dtype {x_T.dtype}")
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must be {form}, got shape {tuple(x_T.shape)}")
    validate.check_finite(x_T, "x_T", form)
    return x_T


def make_grid(schedule, steps: int, spacing: str, *, rho: float = 7.0):
    """The `Grid` every sampler of `run_sampler` steps on: discrete timesteps on a DDPM schedule, else continuous."""
    if schedule.discrete:
        return discrete_grid(schedule, steps, spacing, rho=rho)
    return continuous_grid(schedule, steps, spacing, rho=rho)


def run_sampler(name: str, denoise_fn, schedule, key, shape, *, steps: int, prediction: str = "eps",
                spacing: str = "leading", clip_denoised: float | None = None, guidance: Guidance | None = None,
                uncond_fn=None, options: dict | None = None, rho: float = 7.0, x_T=None, consistency=None):
    """Sample `shape` with sampler `name`. Returns (x_0, info) with info["nfe"].

    schedule: a `DiscreteSchedule` (DDPM betas) or a continuous one from `diffusion_jax.process.sde`.
    denoise_fn(x, t) -> prediction of kind `prediction`; uncond_fn likewise for classifier-free guidance.
    shape: a tuple of positive ints, e.g. (N, H, W, C); x_T, if given, a float array of that shape (else it is
    drawn from `key`). options: a dict of the sampler's own options (`sampler_options(name)`). consistency: a
    consistency model's `objectives.distill.ConsistencyParam` (its x0_hat is f(x, t)), or None.
    """
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict of sampler options (name -> value), got {type(options).__name__}")
    options = dict(options or {})
    entry, solver = get_entry(name), get_sampler(name, **options)
    shape = validate.check_shape(shape, "shape")
    check_process(schedule)
    if x_T is None:
        check_key(key, f"sampler {name!r} without x_T")
    else:
        x_T = _check_x_T(x_T, shape)
    with jax.ensure_compile_time_eval():  # a schedule closed over by a jitted caller gives a concrete grid
        grid = make_grid(schedule, steps, spacing, rho=rho)
        if entry.from_process is not None:
            derived = entry.from_process(schedule, None if _traced(grid) else grid)
            solver = functools.partial(solver, **{k: v for k, v in derived.items() if k not in options})
    denoiser = make_denoiser(denoise_fn, prediction, clip_denoised=clip_denoised, guidance=guidance,
                             uncond_fn=uncond_fn, learned_variance=options.get("variance") == "learned",
                             consistency=consistency)
    if x_T is None:  # N(0, (alpha^2 + sigma^2) I): unit variance for VP, ~sigma_max^2 for VE / EDM (alpha = 1)
        scale = jnp.sqrt(grid.alpha[0] ** 2 + grid.sigma[0] ** 2)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape) * scale
    return solver(denoiser, grid, x_T, None if key is None else jax.random.fold_in(key, 1))


def count_nfe(name: str, schedule, steps: int, *, spacing: str = "leading", options: dict | None = None) -> int | None:
    """Network evaluations of sampler `name` at `steps` steps (a classifier-free-guided evaluation counts once:
    both branches run as one batched call). Found by tracing the sampler with a stand-in network (no compile),
    or, where the count is only known at run time (PC's last step on a traced grid), by running it on one scalar.
    None for the adaptive solver, whose count depends on the data.
    """
    if name == "adaptive":
        get_sampler(name, **dict(options or {}))
        return None
    seen = {}

    def trace(x):
        out, info = run_sampler(name, lambda x, t: x, schedule, jax.random.PRNGKey(0), x.shape, steps=steps,
                                spacing=spacing, options=options)
        seen["nfe"] = info["nfe"]
        return out, info["nfe"]

    x = jax.ShapeDtypeStruct((1, 1), jnp.float32)
    jax.eval_shape(trace, x)
    if isinstance(seen["nfe"], jax.core.Tracer):
        return int(jax.jit(trace)(jnp.zeros(x.shape, x.dtype))[1])
    return int(seen["nfe"])


def steps_for_nfe(name: str, schedule, nfe: int, *, spacing: str = "leading", options: dict | None = None
                  ) -> tuple[int, int]:
    """(steps, exact NFE): the most steps whose NFE does not exceed `nfe`.

    NFE grows with steps for every fixed-step sampler (heun: 2K - 1, plms: K + 1, pndm: K + 9, pc: K (1 +
    correctors)), so a bisection over steps finds it in a few traces. ValueError when no step count fits
    (or for the adaptive solver, which takes rtol / atol instead).
    """
    def count(k):
        return count_nfe(name, schedule, k, spacing=spacing, options=options)

    if name == "adaptive":
        raise ValueError("sampler 'adaptive' chooses its own steps; give it rtol / atol instead of an NFE")
    hi = min(nfe, schedule.num_timesteps) if schedule.discrete else nfe
    return most_steps_within(count, nfe, hi, f"sampler {name!r} with spacing {spacing!r}")


def most_steps_within(count, nfe: int, hi: int, what: str) -> tuple[int, int]:
    """(steps, count(steps)): the most steps in [1, hi] whose count(steps) (the NFE; a ValueError: cannot run at
    that many steps) does not exceed `nfe`, by bisection (counts grow with steps). ValueError naming `what` if none."""
    @functools.lru_cache(maxsize=None)   # each count traces the sampler once (or runs it, for PC / EM)
    def n_of(k):
        try:
            return count(k)
        except ValueError:                # too few steps for the sampler, or a spacing that cannot give k
            return None

    lo = next((k for k in range(1, hi + 1) if n_of(k) is not None), None)
    if lo is None or n_of(lo) > nfe:
        raise ValueError(f"{what} cannot run in {nfe} network evaluations "
                         f"(its fewest is {None if lo is None else n_of(lo)})")
    while lo < hi:                        # invariant: n_of(lo) <= nfe
        mid = (lo + hi + 1) // 2
        n = n_of(mid)
        lo, hi = (mid, hi) if n is not None and n <= nfe else (lo, mid - 1)
    return lo, n_of(lo)
