"""Solver error against a reference ODE solution: known convergence orders on the exact-score testbed, the
order fit, the refusals, and the model panel through `compare --solver-error-nfe` on the tiny trained run."""
import jax
import numpy as np
import pytest

from diffusion_jax.eval import solver_error
from diffusion_jax.eval.solver_error import ErrorSpec, as_grid_solver, convergence_order
from diffusion_jax.process.discrete import make_schedule


@pytest.fixture(scope="module")
def testbed():
    spec = ErrorSpec(samplers=("ddim", "dpmpp_2m"), nfes=(10, 20, 50), num=64, order_range=(10, 50))
    return spec, solver_error.testbed_panel(spec, make_schedule("linear", 1000), prediction="v", dim=64, progress=False)


def test_testbed_orders_are_the_papers(testbed):
    """On the exact score, DDIM (= DPM-Solver-1) converges with order 1 and DPM-Solver++(2M) with order 2 to the
    exact PF-ODE solution (Lu et al. 2022a, 2022b), and the second-order solver is closer at every NFE (paired)."""
    spec, panel = testbed
    orders = {o["sampler"]: o for o in panel["orders"]}
    assert 0.8 <= orders["ddim"]["order"] <= 1.3, orders["ddim"]
    assert 1.7 <= orders["dpmpp_2m"]["order"] <= 2.5, orders["dpmpp_2m"]
    assert orders["ddim"]["lo"] <= orders["ddim"]["order"] <= orders["ddim"]["hi"]
    for row in panel["paired"]:
        assert row["sampler"] == "dpmpp_2m" and row["rms_verdict"] == "better" and row["rms_hi"] < 0, row
    errs = {(c["sampler"], c["target_nfe"]): c["rms_mean"] for c in panel["cells"]}
    assert errs["ddim", 50] < errs["ddim", 20] < errs["ddim", 10]


def test_ddim_is_dpm_solver_1():
    """The panel runs DDIM as DPM-Solver-1 on non-DDPM grids: on a grid both can run, they agree to float32."""
    from diffusion_jax.samplers.registry import run_sampler
    from diffusion_jax.testbed import GaussianMixture, discrete_denoise_fn

    schedule = make_schedule("linear", 1000)
    mix = GaussianMixture.random(jax.random.PRNGKey(0), num_components=4, dim=8)
    denoise_fn = discrete_denoise_fn(mix, schedule, "eps")
    x_T = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
    run = lambda name: run_sampler(name, denoise_fn, schedule, None, x_T.shape, steps=12, spacing="linspace",
                                   x_T=x_T)[0]
    np.testing.assert_allclose(run("ddim"), run("dpm_solver_1"), atol=2e-5)
    assert as_grid_solver("ddim", "logsnr") == "dpm_solver_1" and as_grid_solver("ddim", "linspace") == "ddim"
    assert as_grid_solver("dpmpp_2m", "logsnr") == "dpmpp_2m"


def test_convergence_order_fit():
    rng = np.random.default_rng(0)
    nfes = np.array([10, 20, 50])
    errors = 3.0 * nfes[:, None] ** -2.0 * np.exp(0.05 * rng.standard_normal((3, 400)))
    fit = convergence_order(nfes, errors)
    assert abs(fit["order"] - 2.0) < 0.05 and fit["lo"] < fit["order"] < fit["hi"] and fit["hi"] - fit["lo"] < 0.1
    assert np.isnan(convergence_order([10], errors[:1])["order"])


@pytest.mark.parametrize("kwargs, named", [
    (dict(spacing="trailing"), "trailing"),
    (dict(samplers=("ddim", "ddpm")), "'ddpm' is stochastic"),
    (dict(samplers=("dpmpp_2m",)), "baseline 'ddim'"),
    (dict(samplers=()), "at least one deterministic sampler"),
])
def test_spec_refusals(kwargs, named):
    with pytest.raises(ValueError, match=named):
        ErrorSpec(**kwargs).validate()


def test_zero_terminal_snr_refused_on_linspace():
    schedule = make_schedule("linear", 1000, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        solver_error.testbed_panel(ErrorSpec(spacing="linspace", num=4), schedule, progress=False)


@pytest.mark.slow    # about 30 s: a compare run with the solver-error panels (reference solves included)
def test_compare_with_solver_error_panels(capsys, trained_workdir, tmp_path, metrics_cache):
    """`compare --solver-error-nfe` on the tiny run: both panels, the tables, the CSVs and the plot; the model's
    reference agrees with the 10x-tolerance solve; stochastic and option variants are left out."""
    import csv
    import json

    from diffusion_jax.cli.main import main

    out = tmp_path / "cmp"
    code = main(["compare", "--workdir", trained_workdir, "--samplers", "ddpm,ddim,dpmpp_2m,ddim:eta=1", "--nfe", "4",
                 "--num", "10", "--seeds", "1", "--out", str(out), "--no-progress", "--solver-error-nfe", "4",
                 "--solver-error-num", "6", "--solver-error-tol", "1e-4", "--resamples", "20"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.DictReader(open(out / "solver_error.csv")))
    assert {(r["panel"], r["sampler"], r["target_nfe"]) for r in rows} == {
        (p, s, "4") for p in ("model", "testbed") for s in ("ddim", "dpmpp_2m")}
    model = [r for r in rows if r["panel"] == "model"]
    assert all(float(r["rms_mean"]) > 0 and float(r["feat_mean"]) >= 0 for r in model)
    info = json.loads((out / "solver_error.json").read_text())
    assert info["reference"]["nfe"] > info["reference"]["loose_nfe"] > 0
    assert info["reference"]["check_rms"] < 1e-2          # rtol = atol = 1e-4 vs 1e-3 on [-1, 1] data
    text = (out / "solver_error.md").read_text()
    assert "Empirical convergence order" in text and "adaptive Dopri5" in text and "DPM-Solver-1" in text
    assert (out / "solver_error.png").exists() and (out / "solver_error_paired.csv").exists()
    assert "solver error:" in captured.out
