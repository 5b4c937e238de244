"""The `diffusion-jax` command (also `python -m diffusion_jax`): parse, then call the library.

    diffusion-jax train  --config configs/digits.py --workdir workdirs/digits [--config.train.steps=200]
    diffusion-jax sample --workdir workdirs/digits --sampler ddim --steps 50 --num 64 --seed 0 --out grid.png
    diffusion-jax compare --workdir workdirs/digits --samplers ddim,dpmpp_2m --nfe 5,10,20 --num 500 --out results/c
    diffusion-jax bench train_step --batch 16 --steps 5
"""
from __future__ import annotations

import argparse
import logging
import sys

# Exit codes: 0 done; 2 bad input (nothing was changed); 3 non-finite loss or gradient; 128 + N stopped by
# signal N after saving a checkpoint (130 SIGINT, 143 SIGTERM). See docs/reliability.md.
EXIT_BAD_INPUT = 2


def _train(args, overrides) -> None:
    from diffusion_jax.config import load_experiment
    from diffusion_jax.train.loop import train_and_evaluate
    from diffusion_jax.train.metrics import read_metrics

    exp, _ = load_experiment(args.config, overrides)
    state = train_and_evaluate(exp, args.workdir, progress=not args.no_progress)
    rows = [r for r in read_metrics(args.workdir) if "loss" in r]
    if rows:
        print(f"trained to step {int(state.step)}: loss {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> "
              f"{rows[-1]['loss']:.4f} (step {rows[-1]['step']}); workdir {args.workdir}")


def _sample(args, overrides) -> None:
    if overrides:
        raise ValueError(f"sample takes no --config.* overrides (got {overrides}); its options are flags")
    import dataclasses

    import jax
    import numpy as np

    from diffusion_jax import parallel, viz
    from diffusion_jax.sampling import SamplerSpec, class_labels, make_sample_fn
    from diffusion_jax.schedules import make_schedule
    from diffusion_jax.train.checkpoint import load_trained

    exp, graphdef, params, step = load_trained(args.workdir, args.step)
    # Flags left out fall back to the run's config.sample (its sampler, steps, spacing, clip, num, eta, variance).
    for flag, key in (("sampler", "sampler"), ("steps", "steps"), ("spacing", "spacing"), ("clip", "clip_denoised"),
                      ("num", "num")):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(exp.sample, key))
    explicit = dict(_parse_option(o) for o in args.option)
    if args.eta is not None:
        explicit["eta"] = args.eta
    if args.variance is not None:
        explicit["variance"] = args.variance
    config = dataclasses.replace(exp.sample, sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                                 clip_denoised=args.clip)
    spec = SamplerSpec.from_config(config, options=explicit, guidance_scale=args.guidance_scale)
    options = dict(spec.options)
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if not 1 <= args.steps <= exp.schedule.num_timesteps:
        raise ValueError(f"--steps must be in [1, {exp.schedule.num_timesteps}], got {args.steps}")
    schedule = make_schedule(**dataclasses.asdict(exp.schedule))
    shape = (args.num, exp.model.image_size, exp.model.image_size, exp.model.in_channels)
    mesh = parallel.make_mesh(args.num_devices, flag="--num-devices")
    parallel.check_divisible(args.num, mesh, "--num", hint="--num-devices")
    sample_fn = make_sample_fn(graphdef, schedule, spec, shape, prediction=exp.loss.prediction,
                               learn_sigma=exp.model.learn_sigma, num_classes=exp.model.num_classes, mesh=mesh)
    labels = class_labels(args.num, exp.model.num_classes)
    images, nfe = sample_fn(params, jax.random.PRNGKey(args.seed), labels)
    images = np.asarray(images)
    viz.save_grid(images, args.out)
    print(f"{args.num} samples from step {step} ({args.sampler}, {args.steps} steps, NFE {nfe}"
          f"{', options ' + str(options) if options else ''}) -> {args.out}")
    if args.npz:
        extra = {} if labels is None else {"labels": np.asarray(labels)}
        np.savez(args.npz, images=viz.to_uint8(images), **extra)
        print(f"uint8 NHWC samples -> {args.npz}")


def _compare(args, overrides) -> None:
    if overrides and not args.config:
        raise ValueError(f"--config.* overrides ({overrides}) need --config (the run to train if missing)")
    from diffusion_jax.compare import CompareSpec, run_compare

    if args.config:   # train, resume, or reuse the finished run (train_and_evaluate does nothing more then)
        from diffusion_jax.config import load_experiment
        from diffusion_jax.train.loop import train_and_evaluate

        train_and_evaluate(load_experiment(args.config, overrides)[0], args.workdir, progress=not args.no_progress)

    try:
        nfes = tuple(int(v) for v in _csv(args.nfe))
    except ValueError:
        raise ValueError(f"--nfe must be comma-separated ints, got {args.nfe!r}") from None
    spec = CompareSpec(samplers=tuple(_csv(args.samplers)), nfes=nfes,
                       num=args.num, seeds=args.seeds, spacing=args.spacing,
                       clip_denoised=args.clip or None, guidance_scale=args.guidance_scale,
                       batch_size=args.batch_size)
    res = run_compare(args.workdir, spec, args.out, extractor=args.extractor, step=args.step,
                      progress=not args.no_progress)
    with open(res["markdown"]) as f:
        print(f.read())
    print(f"table:    {res['markdown']} (per seed: {res['csv']}; means: {res['summary_csv']})\n"
          f"plot:     {res['plot']}\noverview: {res['overview']}\ngrids:    {res['grids']}/<sampler>-nfe<N>.png")


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _sweep(args, overrides) -> None:
    from diffusion_jax.sweep import run_sweep

    run_sweep(args.config, args.grid, args.root, overrides=overrides, num=args.num, seed=args.seed,
              extractor=args.extractor, progress=not args.no_progress)


def _bench(args, overrides) -> None:
    if args.name != "train_step":
        raise ValueError(f"unknown benchmark {args.name!r}; available: train_step")
    from diffusion_jax.bench import main as bench_main

    bench_main(args.bench_args)


def _parse_option(text: str):
    """'s_churn=40' -> ('s_churn', 40.0); values are Python literals, else strings."""
    import ast

    key, eq, value = text.partition("=")
    if not eq or not key:
        raise ValueError(f"--option {text!r} must look like NAME=VALUE (e.g. --option s_churn=40)")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def build_parser() -> argparse.ArgumentParser:
    from diffusion_jax.samplers import SAMPLERS, SPACINGS

    parser = argparse.ArgumentParser(prog="diffusion-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a diffusion model from a config file",
                           epilog="Any config value can be overridden: --config.train.steps=200")
    train.add_argument("--config", required=True, help="configs/NAME.py or configs/NAME.py:debug")
    train.add_argument("--workdir", required=True, help="checkpoints, metrics and samples go here")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="sample from the EMA params of a trained workdir",
                            epilog="Flags left out take their value from the run's config.sample.")
    sample.add_argument("--workdir", required=True)
    sample.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                        help="; ".join(f"{k}: {v.about}" for k, v in SAMPLERS.items()))
    sample.add_argument("--steps", type=int, default=None, help="default: the run's config.sample.steps")
    sample.add_argument("--spacing", default=None, choices=list(SPACINGS))
    sample.add_argument("--eta", type=float, default=None, help="ddim / euler_ancestral stochasticity")
    sample.add_argument("--variance", default=None, choices=["fixed_small", "fixed_large", "learned"],
                        help="ddpm variance (default fixed_small)")
    sample.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="any sampler option, repeatable, e.g. --option s_churn=40 --option order=3")
    sample.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance weight (class-conditional models; 1 = off)")
    sample.add_argument("--clip", type=float, default=None, help="clip x0-hat to [-c, c]; 0 disables")
    sample.add_argument("--num", type=int, default=None, help="default: the run's config.sample.num")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--num-devices", type=int, default=0,
                        help="split the samples over this many devices (0 = all); the samples do not depend on it")
    sample.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    sample.add_argument("--out", default="samples.png", help="PNG grid")
    sample.add_argument("--npz", default=None, help="also save uint8 samples to this .npz")
    sample.set_defaults(func=_sample)

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
    compare.add_argument("--spacing", default="trailing", choices=list(SPACINGS))
    compare.add_argument("--clip", type=float, default=1.0, help="clip x0-hat to [-c, c]; 0 disables")
    compare.add_argument("--guidance-scale", type=float, default=1.0)
    compare.add_argument("--batch-size", type=int, default=None, help="images per compiled call (default: --num)")
    compare.add_argument("--extractor", default="classifier", help="classifier | inception[:PATH]")
    compare.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    compare.add_argument("--out", default="results/compare")
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

    bench = sub.add_parser("bench", help="benchmarks (train_step: ours vs diffusers/PyTorch)")
    bench.add_argument("name", choices=["train_step"])
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed on, e.g. --batch 16 --steps 5")
    bench.set_defaults(func=_bench)
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


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides, unknown = [], []
    for item in extra:
        (overrides if item.startswith("--config.") else unknown).append(item)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = [o[len("--config."):] for o in overrides]
    from diffusion_jax.train.faults import TrainingStopped

    _show_library_messages()
    try:
        args.func(args, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"diffusion-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingStopped as e:   # preempted (128 + signal number) or non-finite (3): checkpoints kept
        print(f"diffusion-jax {args.command}: stopped: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
