"""The `diffusion-jax` command (also `python -m diffusion_jax`): parse, then call the library.

    diffusion-jax train  --config configs/digits.py --workdir workdirs/digits [--config.train.steps=200]
    diffusion-jax sample --workdir workdirs/digits --sampler ddim --steps 50 --num 64 --seed 0 --out grid.png
    diffusion-jax edit   --workdir workdirs/digits --task inpaint --image digit.png --mask mask.png --num 4
    diffusion-jax likelihood --workdir workdirs/digits --num 100 --method ode --trace rademacher
    diffusion-jax reflow --workdir workdirs/flow --out pairs.npz --num 20000   # then train with data.name=pairs
    diffusion-jax train-classifier --workdir workdirs/digits --out workdirs/digits_clf   # for classifier guidance
    diffusion-jax compare --workdir workdirs/digits --samplers ddim,dpmpp_2m --nfe 5,10,20 --num 500 --out results/c
    diffusion-jax train --config configs/vae.py:fashion_mnist --workdir workdirs/vae_fmnist   # model.name="vae"
    diffusion-jax convert --from path/to/diffusers-folder --to models/sd15     # SD pipeline or DDPM UNet2DModel
    diffusion-jax export --workdir workdirs/digits --to exported/digits     # a diffusers folder (from_pretrained)
    diffusion-jax generate --workdir models/sd15 --prompt "a photo of a cat" --sampler dpmpp_2m --steps 20
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from diffusion_jax.cli.sampling import add_edit_parser, add_sample_parser

# Exit codes: 0 done; 2 bad input (nothing was changed); 3 non-finite loss or gradient; 128 + N stopped by
# signal N after saving a checkpoint (130 SIGINT, 143 SIGTERM). See docs/reliability.md.
EXIT_BAD_INPUT = 2


def _train(args, overrides) -> None:
    from diffusion_jax.parallel import initialize_distributed, is_main_process
    from diffusion_jax.train.runs import kind_of, load_run

    if args.distributed or args.coordinator is not None:   # before any other JAX call
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    run = load_run(args.config, overrides)   # model.name picks the schema: a denoiser or the autoencoder
    result = kind_of(run).train(run, args.workdir, progress=not args.no_progress)
    if is_main_process():
        print(kind_of(run).summary(result, args.workdir))


def _train_classifier(args, overrides) -> None:
    if overrides:
        raise ValueError(f"train-classifier takes no --config.* overrides (got {overrides}); its options are flags")
    from diffusion_jax.train.classifier import ClassifierRecipe, train_noisy_classifier

    recipe = ClassifierRecipe(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    r = train_noisy_classifier(args.workdir, args.out, recipe, progress=not args.no_progress)
    by_level = ", ".join(f"t={row['t']:g}: {row['accuracy']:.3f}" for row in r["accuracy_by_level"])
    print(f"noise-conditional classifier, {r['step']} steps -> {args.out}; held-out accuracy {by_level}")


def _compare(args, overrides) -> None:
    if overrides and not args.config:
        raise ValueError(f"--config.* overrides ({overrides}) need --config (the run to train if missing)")
    from diffusion_jax.eval.compare import CompareSpec, run_compare

    if args.config:   # train, resume, or reuse the finished run (train_and_evaluate does nothing more then)
        from diffusion_jax.config import load_experiment
        from diffusion_jax.train.loop import train_and_evaluate

        train_and_evaluate(load_experiment(args.config, overrides)[0], args.workdir, progress=not args.no_progress)

    try:
        nfes = tuple(int(v) for v in _csv(args.nfe))
    except ValueError:
        raise ValueError(f"--nfe must be comma-separated ints, got {args.nfe!r}") from None
    from diffusion_jax.eval.compare import DIFFUSERS_PREFIX

    samplers = tuple(_csv(args.samplers)) + tuple(DIFFUSERS_PREFIX + p for p in args.scheduler_config)
    spec = CompareSpec(samplers=samplers, nfes=nfes,
                       num=args.num, seeds=args.seeds, spacing=args.spacing,
                       clip_denoised=args.clip or None, guidance_scale=args.guidance_scale,
                       batch_size=args.batch_size, resamples=args.resamples)
    error_spec = None
    if args.solver_error_nfe:
        from diffusion_jax.eval.solver_error import ErrorSpec
        from diffusion_jax.samplers.registry import get_entry

        ode = tuple(s for s in spec.samplers if ":" not in s and not s.startswith(DIFFUSERS_PREFIX)
                    and not get_entry(s).stochastic)
        error_spec = ErrorSpec(samplers=ode, nfes=tuple(int(v) for v in _csv(args.solver_error_nfe)),
                               num=args.solver_error_num, spacing=args.solver_error_spacing,
                               baseline=ode[0] if ode else "ddim", rtol=args.solver_error_tol,
                               atol=args.solver_error_tol)
        error_spec.validate()                         # before anything is generated
    res = run_compare(args.workdir, spec, args.out, extractor=args.extractor, step=args.step,
                      progress=not args.no_progress)
    with open(res["markdown"]) as f:
        print(f.read())
    print(f"table:    {res['markdown']} (per seed: {res['csv']}; means: {res['summary_csv']})\n"
          f"plot:     {res['plot']}\noverview: {res['overview']}\ngrids:    {res['grids']}/<sampler>-nfe<N>.png")
    if error_spec is not None:
        from diffusion_jax.eval.solver_error import run_panels

        err = run_panels(args.workdir, error_spec, args.out, scorer=res["scorer"], step=args.step,
                         progress=not args.no_progress)
        with open(err["markdown"]) as f:
            print(f.read())
        print(f"solver error: {err['markdown']} (cells: {err['csv']}), plot: {err['plot']}")


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _sweep(args, overrides) -> None:
    from diffusion_jax.eval.sweep import run_sweep

    run_sweep(args.config, args.grid, args.root, overrides=overrides, num=args.num, seed=args.seed,
              extractor=args.extractor, progress=not args.no_progress)


def _likelihood(args, overrides) -> None:
    if overrides:
        raise ValueError(f"likelihood takes no --config.* overrides (got {overrides}); its options are flags")
    from diffusion_jax.eval.likelihood import evaluate_likelihood

    r = evaluate_likelihood(args.workdir, num=args.num, split=args.split, method=args.method, trace=args.trace,
                            probes=args.probes, rtol=args.rtol, atol=args.atol, batch_size=args.batch_size,
                            seed=args.seed, unconditional=args.unconditional, step=args.step, out=args.out,
                            progress=not args.no_progress)
    extra = f"trace {r['trace']} x{r['probes']}, " if r["method"] == "ode" else f"variance {r['variance']}, "
    print(f"{r['bpd_mean']:.4f} +- {r['bpd_stderr']:.4f} bits/dim ({r['method']}, {extra}{r['num']} {r['split']} "
          f"examples, step {r['step']}, mean NFE {r['nfe_mean']:.0f}"
          f"{'' if r.get('solver_success', True) else ', SOLVER HIT max_steps'}) -> {r['out']}")


def _reflow(args, overrides) -> None:
    if overrides:
        raise ValueError(f"reflow takes no --config.* overrides (got {overrides}); its options are flags")
    from diffusion_jax.inference.sampling import SamplerSpec
    from diffusion_jax.train.reflow import draw_pairs

    spec = SamplerSpec(args.sampler, steps=args.steps, spacing=args.spacing, clip_denoised=args.clip or None,
                       guidance_scale=args.guidance_scale)
    meta = draw_pairs(args.workdir, args.out, num=args.num, spec=spec, seed=args.seed, batch_size=args.batch_size,
                      step=args.step, progress=not args.no_progress)
    print(f"{meta['num']} noise-sample pairs of step {meta['step']} ({args.sampler}, {args.steps} steps, NFE "
          f"{meta['nfe']}) -> {args.out}; train on them with --config.data.name=pairs --config.data.data_dir="
          f"{args.out} --config.train.init_from={args.workdir}")


def _check_workdir(args, overrides) -> int:
    if overrides:
        raise ValueError(f"check-workdir takes no --config.* overrides (got {overrides})")
    from diffusion_jax.train.manifest import check_workdir

    rows = check_workdir(args.workdir)
    for r in rows:
        where = f"step {r['step']}" if r["step"] is not None else os.path.basename(r["path"])
        print(f"{where:>12}  {r['status']:<11} {r['path']}")
        for p in r["problems"]:
            print(f"{'':>14}{p}")
    bad = [r for r in rows if r["status"] == "corrupt"]
    good = [r for r in rows if r["status"] in ("ok", "unverified")]
    print(f"{len(good)} readable checkpoint(s) ({sum(r['status'] == 'ok' for r in good)} verified), {len(bad)} "
          f"corrupt; readers use the newest readable one" + (f" (step {good[0]['step']})" if good else ""))
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    from diffusion_jax.samplers import SPACINGS

    parser = argparse.ArgumentParser(prog="diffusion-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also accepted after "
                        "the command, or DIFFUSION_JAX_DEBUG=1); without it a user error is one line and exit 2")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train any registered backbone from a config file (model.name: a "
                           "diffusion model, or the autoencoder of configs/vae.py)",
                           epilog="Any config value can be overridden: --config.train.steps=200")
    train.add_argument("--config", required=True, help="configs/NAME.py or configs/NAME.py:debug (configs/vae.py: "
                       "the KL autoencoder of latent diffusion)")
    train.add_argument("--workdir", required=True, help="checkpoints, metrics and samples go here")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    multi = train.add_argument_group("multi-process (docs/benchmarks.md: running on several hosts)")
    multi.add_argument("--distributed", action="store_true",
                       help="join a multi-process run detected by JAX (SLURM, Open MPI, TPU pod slice)")
    multi.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    multi.add_argument("--num-processes", type=int, default=None)
    multi.add_argument("--process-id", type=int, default=None)
    train.set_defaults(func=_train)

    add_sample_parser(sub)

    tc = sub.add_parser("train-classifier", help="train a noise-conditional classifier for classifier guidance",
                        epilog="Trained on the workdir's data, noised with its schedule (t uniform); resumes from "
                               "OUT's latest checkpoint; a finished OUT is reused.")
    tc.add_argument("--workdir", required=True, help="diffusion run whose data and schedule to use")
    tc.add_argument("--out", required=True, help="classifier directory (orbax checkpoints, config.json, result.json)")
    tc.add_argument("--steps", type=int, default=2000)
    tc.add_argument("--batch-size", type=int, default=128)
    tc.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warmup, then cosine)")
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--no-progress", action="store_true")
    tc.set_defaults(func=_train_classifier)

    add_edit_parser(sub)

    compare = sub.add_parser("compare", help="every sampler at every NFE on a trained workdir: table, plot, grids",
                             epilog="Metrics use the dataset's own classifier (trained once, cached) unless "
                                    "--extractor inception:PATH names the FID InceptionV3 weights file.")
    compare.add_argument("--workdir", required=True)
    compare.add_argument("--config", default=None, help="train WORKDIR from this config first (resumes; a finished "
                                                        "run is reused as is)")
    compare.add_argument("--samplers", default="ddpm,ddim,heun,dpmpp_2m,unipc_bh2",
                         help="comma-separated names, or variants with options: ddim:eta=1,ddpm:variance=fixed_large")
    compare.add_argument("--nfe", default="5,10,20,50,100", help="network-evaluation budgets, comma-separated")
    compare.add_argument("--num", type=int, default=1000, help="samples per cell and seed")
    compare.add_argument("--seeds", type=int, default=3, help="seeds per cell (mean and 95%% CI over them)")
    compare.add_argument("--scheduler-config", action="append", default=[], metavar="PATH",
                         help="repeatable: a diffusers scheduler_config.json, compared as one more sampler "
                              "(its class, grid and options as diffusers runs them)")
    compare.add_argument("--spacing", default="trailing", choices=list(SPACINGS))
    compare.add_argument("--clip", type=float, default=1.0, help="clip x0-hat to [-c, c]; 0 disables")
    compare.add_argument("--guidance-scale", type=float, default=1.0)
    compare.add_argument("--batch-size", type=int, default=None, help="images per compiled call (default: --num)")
    compare.add_argument("--resamples", type=int, default=200, help="bootstrap resamples of the FD intervals")
    compare.add_argument("--extractor", default="classifier", help="classifier | inception[:PATH]")
    compare.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    compare.add_argument("--out", default="results/compare")
    compare.add_argument("--solver-error-nfe", default="", help="also measure each deterministic sampler's error "
                         "against a reference solution of the same ODE at these NFEs (e.g. 5,10,20,50), with the "
                         "exact-score testbed beside it: OUT/solver_error.md / .png")
    compare.add_argument("--solver-error-num", type=int, default=200, help="samples for --solver-error-nfe")
    compare.add_argument("--solver-error-tol", type=float, default=1e-6,
                         help="rtol = atol of the reference solve (adaptive Dopri5); checked against 10x this")
    compare.add_argument("--solver-error-spacing", default="logsnr", choices=list(SPACINGS),
                         help="grid of the solver-error runs (one that ends at the smallest noise level)")
    compare.add_argument("--no-progress", action="store_true")
    compare.set_defaults(func=_compare)

    sweep = sub.add_parser("sweep", help="ablation grid: train (or resume) and evaluate every cell, write a table",
                           epilog="Grid: axes separated by ';', values by ',' (or by '|' when a value holds a comma: "
                                  "model.channel_mult=(1,2)|(1,2,4)). Cells differing only in sample.* keys share "
                                  "one trained workdir. Any config value can be overridden: --config.train.steps=200")
    sweep.add_argument("--config", required=True, help="configs/NAME.py or configs/NAME.py:debug")
    sweep.add_argument("--grid", required=True,
                       help="e.g. 'model.channels=8,16;optim.learning_rate=1e-3,2e-3' or 'sample.sampler=ddim,heun'")
    sweep.add_argument("--root", required=True, help="ROOT/<cell>/ workdirs, ROOT/summary.csv, ROOT/summary.md")
    sweep.add_argument("--num", type=int, default=200, help="samples per cell for the metrics")
    sweep.add_argument("--seed", type=int, default=0, help="sampling seed (common noise across cells)")
    sweep.add_argument("--extractor", default="classifier", help="classifier | inception[:PATH]")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.set_defaults(func=_sweep)

    lik = sub.add_parser("likelihood", help="bits/dim of held-out data: PF-ODE log-likelihood or the DDPM VLB",
                         epilog="ode: dequantized 8-bit data, adaptive Tsit5, exact or Hutchinson divergence; "
                                "vlb: Ho et al.'s bound over all T timesteps with the discretized decoder.")
    lik.add_argument("--workdir", required=True)
    lik.add_argument("--num", type=int, required=True, help="number of examples (the first N of the split)")
    lik.add_argument("--split", default=None, help="data split (default: test where the dataset has one)")
    lik.add_argument("--method", default="ode", help="ode | vlb")
    lik.add_argument("--trace", default=None, help="ode divergence: exact | rademacher | gaussian (default rademacher)")
    lik.add_argument("--probes", type=int, default=None, help="Hutchinson probes per example (default 1)")
    lik.add_argument("--rtol", type=float, default=1e-5, help="ode solver relative tolerance")
    lik.add_argument("--atol", type=float, default=1e-5, help="ode solver absolute tolerance")
    lik.add_argument("--batch-size", type=int, default=None, help="examples per compiled call (default min(64, num))")
    lik.add_argument("--seed", type=int, default=0, help="dequantization, probes and VLB noise")
    lik.add_argument("--unconditional", action="store_true", help="class-conditional model: use the null class")
    lik.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    lik.add_argument("--out", default=None, help="JSON file (default WORKDIR/likelihood_METHOD.json)")
    lik.add_argument("--no-progress", action="store_true")
    lik.set_defaults(func=_likelihood)

    reflow = sub.add_parser("reflow", help="noise-sample pairs of a trained run's ODE, for a 2-rectified flow",
                            epilog="Then train a flow on them: --config.data.name=pairs --config.data.data_dir=OUT "
                                   "--config.train.init_from=WORKDIR (train/reflow.py).")
    reflow.add_argument("--workdir", required=True, help="a trained flow (or VP / DDPM) run")
    reflow.add_argument("--out", required=True, help="the .npz pair file to write")
    reflow.add_argument("--num", type=int, required=True, help="number of pairs")
    reflow.add_argument("--sampler", default="flow_heun", help="a deterministic sampler (default flow_heun)")
    reflow.add_argument("--steps", type=int, default=25)
    reflow.add_argument("--spacing", default="trailing", choices=list(SPACINGS),
                        help="default trailing: equal steps in t down to the clean end")
    reflow.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    reflow.add_argument("--clip", type=float, default=0.0, help="clip x0-hat to [-c, c]; 0 (default) disables")
    reflow.add_argument("--seed", type=int, default=0, help="the noise of chunk c is fold_in(PRNGKey(seed), c)")
    reflow.add_argument("--batch-size", type=int, default=500, help="pairs per compiled call")
    reflow.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    reflow.add_argument("--no-progress", action="store_true")
    reflow.set_defaults(func=_reflow)

    check = sub.add_parser("check-workdir", help="verify every checkpoint of a workdir against its manifest",
                           epilog="Exit 0 when no checkpoint is corrupt, 1 when one is (readers then skip it).")
    check.add_argument("workdir")
    check.set_defaults(func=_check_workdir)

    from diffusion_jax.cli.pipelines import add_convert_parser, add_export_parser, add_generate_parser

    add_generate_parser(sub)   # text-to-image with a Stable Diffusion folder; handlers in pipelines/cli.py
    add_convert_parser(sub)    # diffusers folders -> our formats
    add_export_parser(sub)     # and back: a trained workdir -> a diffusers folder
    return parser


def _show_library_messages() -> None:
    """INFO messages of the `diffusion_jax` loggers (e.g. "resuming from ...") to stderr, once per process."""
    library_log = logging.getLogger("diffusion_jax")
    if not any(getattr(h, "diffusion_jax_cli", False) for h in library_log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.diffusion_jax_cli = True
        library_log.addHandler(handler)
        library_log.setLevel(logging.INFO)


def _enable_compile_cache() -> None:
    """Persistent XLA compilation cache, so that a second run of a command loads its compiled steps instead of
    compiling them: $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME (~/.cache)/diffusion_jax/jax.
    DIFFUSION_JAX_COMPILE_CACHE=0 turns it off."""
    if os.environ.get("DIFFUSION_JAX_COMPILE_CACHE", "1") == "0":
        return
    import jax

    if jax.config.jax_compilation_cache_dir:   # set by the user (JAX reads JAX_COMPILATION_CACHE_DIR itself)
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "diffusion_jax", "jax"))


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DIFFUSION_JAX_DEBUG", "0") == "1"
    argv = [a for a in argv if a != "--debug"]   # accepted anywhere on the line
    args, extra = parser.parse_known_args(argv)
    overrides, unknown = [], []
    for item in extra:
        (overrides if item.startswith("--config.") else unknown).append(item)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = [o[len("--config."):] for o in overrides]
    from diffusion_jax.cli.errors import user_error
    from diffusion_jax.host import reuse_host_memory
    from diffusion_jax.train.faults import TrainingStopped

    _show_library_messages()
    reuse_host_memory()      # before JAX starts its CPU backend (diffusion_jax/host.py)
    _enable_compile_cache()
    try:
        code = args.func(args, overrides)   # None (done) or the command's own exit code (check-workdir)
    except TrainingStopped as e:   # preempted (128 + signal number) or non-finite (3): checkpoints kept
        print(f"diffusion-jax {args.command}: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:   # a user error: one line naming it, exit 2 (cli/errors.py); a bug: its traceback
        line = user_error(e)
        if line is None or debug:
            raise
        print(f"diffusion-jax {args.command}: error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
