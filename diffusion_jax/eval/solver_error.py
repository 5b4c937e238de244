"""Solver error against a reference solution of the *same* probability-flow ODE from the *same* x_T, paired.

    spec = ErrorSpec(samplers=("ddim", "dpmpp_2m", "unipc_bh2"), nfes=(5, 10, 20, 50), num=200)
    panel = model_panel(exp, graphdef, params, schedule, spec)   # the network; reference: adaptive Dopri5 at 1e-6
    panel = testbed_panel(spec, schedule, prediction="v", dim=256)   # exact Gaussian-mixture score, exact reference

This is how solver papers separate solvers (Lu et al. 2022, Fig. 3; Zhao et al. 2023): the network is held fixed,
so the distance of a K-step solution to the converged one is the solver's error alone (truncation), with no model
error and no sampling noise in it. Per sample i and cell (sampler, NFE):

    rms_i  = sqrt(mean_d (x_i - x*_i)^2)          per-dimension RMS in data units ([-1, 1] pixels), unclipped
    feat_i = sqrt(mean_f (phi(x_i) - phi(x*_i))^2) the same in the classifier's feature space (model panel)

Both are averaged over samples with a t-interval; every sampler is compared with the baseline (DDIM) on the same
samples (paired: d_i = err_i - err_baseline_i). The empirical convergence order p is the slope of
-log(mean rms) against log(NFE) by least squares over NFEs in `order_range` (error ~ C NFE^-p: DDIM 1, DPM-Solver++(2M)
2), with a bootstrap interval over samples. The model's reference is checked against a second solve at 10x the
tolerance: their distance estimates that looser solve's error, above the reference's own, and is printed beside
the table.

Both panels solve the problem the solvers solve: from the grid's first level to its smallest positive noise level
(timestep 0: a network was never trained below it), then the denoising jump x0 = x0_hat there, which every solver's
last step takes (it differs from the ODE's end point at sigma = 0 by O(sigma_min^2), about 1e-4). The grid must end at
that level for every step count (`validate`): DDIM's leading / trailing timesteps end at ~T/K, whose jump is a
first-order error of its own.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.eval.metrics.paired import mean_interval, paired_mean_difference
from diffusion_jax.samplers.registry import get_entry, run_sampler, steps_for_nfe


@dataclasses.dataclass(frozen=True)
class ErrorSpec:
    """What to measure. samplers: deterministic registry names; nfes: target NFE budgets (each cell runs the most
    steps whose NFE fits, `steps_for_nfe`); num: samples (x_T drawn from PRNGKey(seed)); order_range: the NFEs the
    convergence order is fitted over; rtol / atol: the reference solve's tolerances."""
    samplers: tuple[str, ...] = ("ddim", "dpmpp_2m", "unipc_bh2")
    nfes: tuple[int, ...] = (5, 10, 20, 50)
    num: int = 200
    spacing: str = "logsnr"
    baseline: str = "ddim"
    order_range: tuple[int, int] = (10, 50)
    rtol: float = 1e-6
    atol: float = 1e-6
    seed: int = 0

    def validate(self) -> None:
        if self.spacing in ("leading", "trailing"):
            raise ValueError(f"solver error needs a grid that ends at the schedule's smallest noise level, where the "
                             f"reference ends; spacing {self.spacing!r} ends at timestep ~T/K, and its final jump to "
                             "the data is a first-order error of its own that hides every solver's order; use "
                             "'logsnr' (DPM-Solver's), 'karras' or 'linspace'")
        if not self.samplers:
            raise ValueError("solver error needs at least one deterministic sampler (e.g. ddim, dpmpp_2m, unipc_bh2)")
        for name in self.samplers:
            if get_entry(name).stochastic:
                raise ValueError(f"solver error needs deterministic samplers; {name!r} is stochastic (its sample "
                                 "depends on the noise, not only on x_T)")
        if self.baseline not in self.samplers:
            raise ValueError(f"baseline {self.baseline!r} must be one of the samplers {self.samplers}")
        if not self.nfes or min(self.nfes) < 1 or self.num < 2:
            raise ValueError(f"nfes must be ints >= 1 and num >= 2, got nfes={self.nfes}, num={self.num}")


def as_grid_solver(name: str, spacing: str) -> str:
    """DDIM's own loop runs on integer DDPM timesteps only; on other grids its update is DPM-Solver-1's (Lu et al.
    2022a, sec. 4.1: DDIM is DPM-Solver-1 with noise prediction), so "ddim" runs as "dpm_solver_1" there."""
    return "dpm_solver_1" if name == "ddim" and spacing not in ("leading", "trailing", "linspace") else name


def per_sample_rms(x, ref) -> np.ndarray:
    """(N,) RMS over all non-batch axes of x - ref (float64)."""
    d = np.asarray(x, np.float64) - np.asarray(ref, np.float64)
    return np.sqrt(np.mean(d.reshape(len(d), -1) ** 2, axis=1))


def convergence_order(nfes, errors, *, num_resamples: int = 500, seed: int = 0, level: float = 0.95) -> dict:
    """Empirical order p from errors (K, N) (per sample, at K NFEs): -slope of log(mean_i err) vs log(nfe), with a
    percentile bootstrap interval over samples. {"order", "lo", "hi", "nfes"}; NaN when fewer than 2 NFEs."""
    nfes, errors = np.asarray(nfes, np.float64), np.asarray(errors, np.float64)
    if len(nfes) < 2:
        return {"order": float("nan"), "lo": float("nan"), "hi": float("nan"), "nfes": nfes.tolist()}
    x = np.log(nfes) - np.log(nfes).mean()
    slope = lambda m: -float(x @ (np.log(m) - np.log(m).mean()) / (x @ x))
    idx = np.random.default_rng(seed).integers(0, errors.shape[1], (num_resamples, errors.shape[1]))
    boot = [slope(errors[:, i].mean(1)) for i in idx]
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"order": slope(errors.mean(1)), "lo": float(lo), "hi": float(hi), "nfes": nfes.astype(int).tolist()}


def measure(run, schedule, x_T, reference, spec: ErrorSpec, *, features=None, progress: bool = True) -> dict:
    """The panel's numbers. run(name, steps, x_T) -> (x0 (N, ...), nfe) solves with one sampler; reference (N, ...)
    is x* for the same x_T; features(x) -> (N, F) or None. Returns {"cells": [...], "paired": [...], "orders":
    [...]} (rows of plain floats, ready for CSV / markdown)."""
    from tqdm.auto import tqdm

    spec.validate()
    feat_ref = None if features is None else features(reference)
    errs, cells, notes = {}, [], []
    todo = [(name, nfe) for name in spec.samplers for nfe in spec.nfes]
    for name, nfe in tqdm(todo, desc="solver error", disable=not progress):
        solver = as_grid_solver(name, spec.spacing)
        try:
            steps, used = steps_for_nfe(solver, schedule, nfe, spacing=spec.spacing)
        except ValueError as e:                        # e.g. a warm-up that does not fit in the budget
            notes.append(f"{name} at NFE {nfe}: skipped ({e})")
            continue
        x, _ = run(solver, steps, x_T)
        rms = per_sample_rms(x, reference)
        row = {"sampler": name, "target_nfe": nfe, "nfe": used, "steps": steps}
        row.update({f"rms_{k}": v for k, v in mean_interval(rms).items() if k != "n"})
        if feat_ref is not None:
            feat = per_sample_rms(features(x), feat_ref)
            row.update({f"feat_{k}": v for k, v in mean_interval(feat).items() if k != "n"})
            errs[name, nfe] = (rms, feat)
        else:
            errs[name, nfe] = (rms, None)
        cells.append(row | {"n": len(rms)})
    paired = []
    for (name, nfe), (rms, feat) in errs.items():
        base = errs.get((spec.baseline, nfe))
        if name == spec.baseline or base is None:
            continue
        row = {"sampler": name, "baseline": spec.baseline, "target_nfe": nfe}
        row.update({f"rms_{k}": v for k, v in paired_mean_difference(rms, base[0]).items()})
        if feat is not None:
            row.update({f"feat_{k}": v for k, v in paired_mean_difference(feat, base[1]).items()})
        paired.append(row)
    lo, hi = spec.order_range
    orders = []
    for name in spec.samplers:
        used = [(c["nfe"], c["target_nfe"]) for c in cells if c["sampler"] == name and lo <= c["target_nfe"] <= hi]
        fit = convergence_order([u for u, _ in used], [errs[name, t][0] for _, t in used], seed=spec.seed)
        orders.append({"sampler": name, **fit})
    return {"cells": cells, "paired": paired, "orders": orders, "notes": notes}


def model_panel(exp, graphdef, params, schedule, spec: ErrorSpec, *, scorer=None, batch_size: int = 200,
                progress: bool = True) -> dict:
    """`measure` on a trained run's EMA network (`load_trained`'s exp, graphdef, params; its schedule from
    `config.build_schedule`; class-conditional: balanced labels i mod C), reference from the adaptive solver at
    (rtol, atol); adds "reference": {"nfe", "loose_nfe", "check_rms"} (distance to the 10x-tolerance solve)."""
    from diffusion_jax.config import sampling_kwargs
    from diffusion_jax.eval.evaluate import balanced_labels
    from diffusion_jax.inference.sampling import SamplerSpec, make_sample_fn, sample_from

    m = exp.model
    _check_finite_start(schedule, spec)
    shape = (spec.num, m.image_size, m.image_size, m.in_channels)
    x_T = jax.random.normal(jax.random.PRNGKey(spec.seed), shape, jnp.float32)
    y = None if m.num_classes is None else balanced_labels(spec.num, m.num_classes)
    ref_steps = schedule.num_timesteps if schedule.discrete else 1000   # the adaptive solver: on all the levels

    @functools.lru_cache(maxsize=None)
    def compiled(name, steps, options):
        sampler = SamplerSpec(name, steps=steps, spacing=spec.spacing, clip_denoised=None, options=options)
        batch = min(batch_size, spec.num)
        return batch, make_sample_fn(graphdef, schedule, sampler, (batch,) + shape[1:], **sampling_kwargs(exp))

    def run(name, steps, x, options=()):
        batch, fn = compiled(name, steps, options)
        return sample_from(fn, params, x, y, batch=batch, key=jax.random.PRNGKey(0))

    ref, ref_nfe = run("adaptive", ref_steps, x_T, (("atol", spec.atol), ("rtol", spec.rtol), ("solver", "dopri5")))
    loose, loose_nfe = run("adaptive", ref_steps, x_T,
                           (("atol", 10 * spec.atol), ("rtol", 10 * spec.rtol), ("solver", "dopri5")))
    check = mean_interval(per_sample_rms(loose, ref))
    features = None
    if scorer is not None:
        features = lambda x: scorer.features(np.clip(np.asarray(x), -1.0, 1.0))[0]
    panel = measure(run, schedule, x_T, ref, spec, features=features, progress=progress)
    panel["reference"] = {"nfe": ref_nfe, "loose_nfe": loose_nfe, "check_rms": check["mean"], "rtol": spec.rtol}
    return panel


def testbed_panel(spec: ErrorSpec, schedule, *, prediction: str = "eps", dim: int = 256, num_components: int = 10,
                  progress: bool = True) -> dict:
    """`measure` with the exact denoiser of a Gaussian mixture in R^dim (the testbed) on the same discrete
    `schedule`: no model error at all, and the reference is the exact PF-ODE (float64 Dopri8 at 1e-10) from the grid's
    first level to its smallest positive one, then the exact denoising jump, as the solvers end. What is left is
    the solver's own error."""
    from diffusion_jax.samplers.grid import discrete_grid
    from diffusion_jax.testbed import GaussianMixture, discrete_denoise_fn, reference_ode_solution

    _check_finite_start(schedule, spec)
    mix = GaussianMixture.random(jax.random.PRNGKey(spec.seed + 1), num_components=num_components, dim=dim)
    denoise_fn = discrete_denoise_fn(mix, schedule, prediction)
    x_T = jax.random.normal(jax.random.PRNGKey(spec.seed), (spec.num, dim), jnp.float32)
    grid = discrete_grid(schedule, max(spec.nfes), spec.spacing)     # its ends are every grid's ends
    pos = np.asarray(grid.sigma) > 0
    a_T, s_T = float(grid.alpha[0]), float(grid.sigma[0])
    a_0, s_0 = float(np.asarray(grid.alpha)[pos][-1]), float(np.asarray(grid.sigma)[pos][-1])
    x_min = reference_ode_solution(mix, x_T, s_T, s_0, alpha_from=a_T, alpha_to=a_0)
    with jax.enable_x64(True):
        ref = np.asarray(mix.astype(jnp.float64).x0_mean(jnp.asarray(x_min), a_0, s_0))

    @functools.lru_cache(maxsize=None)
    def compiled(name, steps):
        return jax.jit(lambda x: run_sampler(name, denoise_fn, schedule, None, x.shape, steps=steps,
                                             prediction=prediction, spacing=spec.spacing, x_T=x)[0])

    run = lambda name, steps, x: (np.asarray(compiled(name, steps)(x)), None)
    return measure(run, schedule, x_T, ref, spec, progress=progress) | {"dim": dim, "components": num_components}


def _check_finite_start(schedule, spec: ErrorSpec) -> None:
    alpha_T = float(schedule.alpha(schedule.t_max)) if schedule.discrete else 1.0
    if spec.spacing in ("trailing", "linspace") and alpha_T == 0.0:
        raise ValueError("solver error: the schedule has zero terminal SNR (alpha_T = 0), so the probability-flow "
                         f"ODE starts at infinite noise and has no reference solution from x_T on spacing "
                         f"{spec.spacing!r}; use 'logsnr' or 'karras' (they start at alpha_bar = 2^-24, as diffusers "
                         "does) or a schedule with finite terminal SNR")


def run_panels(workdir: str, spec: ErrorSpec, out: str, *, scorer=None, step: int | None = None,
               progress: bool = True) -> dict:
    """Both panels on a trained run (the testbed on the run's own schedule and prediction), written under `out`:
    solver_error.md, solver_error.csv (cells), solver_error_paired.csv, solver_error.png. Returns the paths and
    the panels."""
    import os

    from diffusion_jax.config import build_schedule
    from diffusion_jax.eval import report
    from diffusion_jax.fileio import write_json
    from diffusion_jax.train.checkpoint import load_trained

    exp, graphdef, params, ckpt = load_trained(workdir, step)
    schedule = build_schedule(exp.schedule, params)
    model = model_panel(exp, graphdef, params, schedule, spec, scorer=scorer, progress=progress)
    m = exp.model                                     # the testbed lives in the model's data dimension
    testbed = testbed_panel(spec, schedule, prediction=exp.loss.prediction, dim=m.image_size ** 2 * m.in_channels,
                            progress=progress)
    os.makedirs(out, exist_ok=True)
    rows = [{"panel": name, **r} for name, p in (("model", model), ("testbed", testbed)) for r in p["cells"]]
    paired = [{"panel": name, **r} for name, p in (("model", model), ("testbed", testbed)) for r in p["paired"]]
    paths = {"csv": report.write_csv(rows, os.path.join(out, "solver_error.csv")),
             "paired_csv": report.write_csv(paired, os.path.join(out, "solver_error_paired.csv")),
             "json": os.path.join(out, "solver_error.json")}
    write_json(paths["json"], {"spec": dataclasses.asdict(spec), "reference": model["reference"],
                               "orders": {"model": model["orders"], "testbed": testbed["orders"]}}, indent=1)
    from diffusion_jax.eval.compare_plots import plot_solver_error

    paths["plot"] = plot_solver_error({"model": model, "testbed": testbed}, spec,
                                      os.path.join(out, "solver_error.png"))
    text = markdown(model, testbed, spec, title=f"# Solver error: {exp.data.name}, checkpoint step {ckpt}")
    paths["markdown"] = os.path.join(out, "solver_error.md")
    with open(paths["markdown"], "w") as f:
        f.write(text)
    return {"model": model, "testbed": testbed, **paths}


def markdown(model: dict, testbed: dict, spec: ErrorSpec, title: str = "# Solver error") -> str:
    """The tables: per-sample RMS error to the reference (mean ± 95% CI), its paired difference to the baseline
    with a verdict, the feature-space error (model), and the empirical orders, for both panels."""
    from diffusion_jax.eval import report

    lo, hi = spec.order_range
    ref = model.get("reference", {})
    ratio = ref.get("check_rms", float("nan")) / min((c["rms_mean"] for c in model["cells"]), default=float("nan"))
    label = lambda n: f"NFE {n}"
    cell = lambda r, k: f"{r[k + '_mean']:.3g} ± {r[k + '_half']:.2g}"
    pair = lambda r, k: f"{r[k + '_diff']:+.3g} [{r[k + '_lo']:+.3g}, {r[k + '_hi']:+.3g}] {r[k + '_verdict']}"
    text = [title, "",
            f"{spec.num} samples, the same x_T (and balanced labels) for every sampler, spacing `{spec.spacing}`. "
            "Error = per-sample RMS distance to the reference solution of the same ODE from the same x_T, unclipped, "
            "mean ± 95% t-interval over samples. Paired: the per-sample difference to "
            f"{spec.baseline}'s error (negative = closer to the reference than {spec.baseline})."
            + (" DDIM runs as its equal, DPM-Solver-1, on this grid." if as_grid_solver("ddim", spec.spacing) !=
               "ddim" and "ddim" in spec.samplers else ""), "",
            f"**Model** reference: adaptive Dopri5 at rtol = atol = {spec.rtol:g}, {ref.get('nfe')} NFE; a second "
            f"solve at 10x the tolerance ({ref.get('loose_nfe')} NFE) is {ref.get('check_rms', float('nan')):.2g} "
            f"RMS away, {ratio:.0%} of the smallest solver error below (that solve's own error; the reference's is "
            "smaller by about the tolerance ratio).",
            f"**Testbed**: a {testbed.get('components')}-component Gaussian mixture in R^{testbed.get('dim')} with its "
            "exact denoiser on the same schedule and parameterization (no model error), reference = the exact PF-ODE "
            "(float64, Dopri8 at 1e-10).", ""]
    tables = (("cells", "rms", cell, "RMS error to the reference (data units)"),
              ("cells", "feat", cell, "error in the classifier's feature space (RMS over features)"),
              ("paired", "rms", pair, f"paired RMS error minus {spec.baseline}'s"),
              ("paired", "feat", pair, f"paired feature-space error minus {spec.baseline}'s"))
    for name, p in (("model", model), ("testbed", testbed)):
        for rows_key, kind, show, heading in tables:
            rows = p[rows_key]
            if rows and any(k.startswith(kind + "_") for k in rows[0]):
                text += [f"## {name.capitalize()}: {heading}", "",
                         report.pivot_markdown([r | {"shown": show(r, kind)} for r in rows], "sampler", "target_nfe",
                                               "shown", col_label=label)]
    rows = [[o["sampler"]] + [f"{p['orders'][i]['order']:.2f} [{p['orders'][i]['lo']:.2f}, {p['orders'][i]['hi']:.2f}]"
                              for p in (model, testbed)] for i, o in enumerate(model["orders"])]
    text += [f"## Empirical convergence order (slope of log error vs log NFE over NFE {lo}-{hi}, 95% bootstrap)", "",
             report.markdown_table(["sampler", "model", "testbed"], rows)]
    notes = list(dict.fromkeys(model.get("notes", []) + testbed.get("notes", [])))
    if notes:
        text += ["## Not run", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(text)
